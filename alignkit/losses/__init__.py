"""Loss nodes. Each returns a dict of named terms plus the total under ``"loss"``."""

from alignkit.losses.combine import WeightedLoss, WeightSchedule
from alignkit.losses.contrastive import InfoNCE, LogitScaler
from alignkit.losses.distill import FeatureDistillation, HybridDistillation, LogitDistillation
from alignkit.losses.rafa import RandomFeatureAlignment

__all__ = [
    "FeatureDistillation",
    "HybridDistillation",
    "InfoNCE",
    "LogitDistillation",
    "LogitScaler",
    "RandomFeatureAlignment",
    "WeightSchedule",
    "WeightedLoss",
]
