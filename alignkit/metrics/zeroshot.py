"""Zero-shot classification metrics on precomputed embeddings (CLIP / CLIP_benchmark protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["zeroshot_classifier", "zeroshot_logits", "zeroshot_metrics"]


def zeroshot_classifier(text_embeddings: Tensor) -> Tensor:
    """Class weights from per-class, per-template text embeddings.

    ``text_embeddings`` is ``(C, T, d)`` (C classes, T templates) or ``(C, d)`` (one template).
    Each prompt embedding is L2-normalised, averaged over templates, and the mean re-normalised
    (the prompt-ensemble of Radford et al. 2021 and CLIP_benchmark). Returns ``(C, d)``.
    """
    if text_embeddings.ndim == 2:
        text_embeddings = text_embeddings.unsqueeze(1)
    if text_embeddings.ndim != 3:
        raise ValueError(f"text_embeddings must be (C, T, d) or (C, d), got {tuple(text_embeddings.shape)}")
    mean = F.normalize(text_embeddings.float(), dim=-1).mean(dim=1)
    return F.normalize(mean, dim=-1)


def zeroshot_logits(image_embeddings: Tensor, classifier: Tensor, scale: float = 100.0) -> Tensor:
    """``scale · cos(image, class)``, shape ``(N, C)``; images are L2-normalised here."""
    return scale * F.normalize(image_embeddings.float(), dim=-1) @ classifier.float().T


def zeroshot_metrics(logits: Tensor, labels: Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (k clipped to the number of classes) and mean per-class recall.

    Keys: ``top{k}`` for each k and ``mean_per_class_recall`` (balanced accuracy: the recall of each
    class that has at least one sample, averaged over those classes, as sklearn's
    ``balanced_accuracy_score``). Ties in the top-k follow ``torch.topk``.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits (N, C) and labels (N,) expected, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("zeroshot_metrics needs at least one sample")
    labels = labels.long().to(logits.device)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    kmax = min(max(topk), num_classes)
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    out: dict[str, float] = {}
    for k in topk:
        out[f"top{k}"] = hits[:, : min(k, num_classes)].any(dim=1).float().mean().item()
    correct = hits[:, 0].float()
    per_class_n = torch.bincount(labels, minlength=num_classes).float()
    per_class_hit = torch.zeros(num_classes, device=logits.device).index_add_(0, labels, correct)
    present = per_class_n > 0
    out["mean_per_class_recall"] = (per_class_hit[present] / per_class_n[present]).mean().item()
    return out
