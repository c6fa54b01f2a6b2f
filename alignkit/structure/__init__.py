"""Aligning frozen unimodal encoders (STRUCTURE): tower node, feature data node, module, export."""

from alignkit.structure.data import FeaturePairDataModule
from alignkit.structure.model import AlignedDualEncoder, load_aligned
from alignkit.structure.module import StructureModule
from alignkit.structure.towers import FrozenTowers

__all__ = ["AlignedDualEncoder", "FeaturePairDataModule", "FrozenTowers", "StructureModule", "load_aligned"]
