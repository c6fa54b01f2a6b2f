"""Evaluation metrics on precomputed embeddings (no model inside)."""

from alignkit.metrics.geometry import (
    Projection2D,
    alignment,
    gap_l2,
    gap_sq_per_dim,
    geometry_metrics,
    pca_2d,
    positive_cosine,
    uniformity,
)
from alignkit.metrics.retrieval import retrieval_metrics
from alignkit.metrics.zeroshot import zeroshot_classifier, zeroshot_logits, zeroshot_metrics

__all__ = [
    "Projection2D",
    "alignment",
    "gap_l2",
    "gap_sq_per_dim",
    "geometry_metrics",
    "pca_2d",
    "positive_cosine",
    "retrieval_metrics",
    "uniformity",
    "zeroshot_classifier",
    "zeroshot_logits",
    "zeroshot_metrics",
]
