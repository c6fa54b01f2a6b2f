"""Loss nodes. Each returns a dict of named terms plus the total under ``"loss"``."""

from alignkit.losses.align_uniform import Alignment, Uniformity
from alignkit.losses.calibrated_uniformity import CalibratedUniformity
from alignkit.losses.combine import WeightedLoss, WeightSchedule
from alignkit.losses.contrastive import InfoNCE, LogitScaler
from alignkit.losses.distill import FeatureDistillation, HybridDistillation, LogitDistillation
from alignkit.losses.rafa import RandomFeatureAlignment
from alignkit.losses.softened_infonce import SoftenedInfoNCE

__all__ = [
    "Alignment",
    "CalibratedUniformity",
    "FeatureDistillation",
    "HybridDistillation",
    "InfoNCE",
    "LogitDistillation",
    "LogitScaler",
    "RandomFeatureAlignment",
    "SoftenedInfoNCE",
    "Uniformity",
    "WeightSchedule",
    "WeightedLoss",
]
