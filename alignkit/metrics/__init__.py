"""Evaluation metrics on precomputed embeddings (no model inside); re-exports every submodule's public names."""

from alignkit.metrics import geometry, retrieval, zeroshot
from alignkit.metrics.geometry import *  # noqa: F403
from alignkit.metrics.retrieval import *  # noqa: F403
from alignkit.metrics.zeroshot import *  # noqa: F403

__all__ = [*geometry.__all__, *retrieval.__all__, *zeroshot.__all__]
