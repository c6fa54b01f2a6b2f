"""Embedding-space geometry: modality gap, alignment, uniformity, positive cosine, 2-D projection.

All functions L2-normalise their inputs first (the metrics are defined on the unit sphere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Projection2D",
    "alignment",
    "gap_l2",
    "gap_sq_per_dim",
    "geometry_metrics",
    "pca_2d",
    "positive_cosine",
    "uniformity",
]


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def gap_l2(image: Tensor, text: Tensor) -> float:
    """‖mean(img) − mean(txt)‖₂ of the normalised embeddings (Liang et al. 2022, "Mind the gap")."""
    return (_unit(image).mean(0) - _unit(text).mean(0)).norm().item()


def gap_sq_per_dim(image: Tensor, text: Tensor) -> float:
    """‖mean(img) − mean(txt)‖₂² / d, i.e. ``mse(c_I, c_T)`` as in the CLIP-Refine code (paper reports ×10³)."""
    diff = _unit(image).mean(0) - _unit(text).mean(0)
    return (diff.pow(2).sum() / diff.numel()).item()


def alignment(x: Tensor, y: Tensor) -> float:
    """E‖x_i − y_i‖₂² over positive pairs (rows of x and y), Wang & Isola 2020 with α=2. Lower = better aligned."""
    if x.shape != y.shape:
        raise ValueError(f"alignment needs paired rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (_unit(x) - _unit(y)).pow(2).sum(-1).mean().item()


def positive_cosine(x: Tensor, y: Tensor) -> float:
    """Mean cosine similarity of positive pairs (rows of x and y)."""
    if x.shape != y.shape:
        raise ValueError(f"positive_cosine needs paired rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (_unit(x) * _unit(y)).sum(-1).mean().item()


def uniformity(x: Tensor, t: float = 2.0, chunk_size: int = 1024) -> float:
    """log E_{u≠v} exp(−t‖u − v‖₂²) over all distinct pairs of rows (Wang & Isola 2020, t=2).

    Always ≤ 0; lower (more negative) = more uniform on the sphere. The N×N distance matrix is built
    ``chunk_size`` rows at a time and reduced with logsumexp, so large sets fit in memory and the
    result does not underflow.
    """
    u = _unit(x)
    n = u.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    parts = []
    for start in range(0, n, chunk_size):
        block = u[start : start + chunk_size]
        # ‖a−b‖² = 2 − 2a·b on the unit sphere; clamp guards tiny negative values from rounding.
        sq = (2.0 - 2.0 * block @ u.T).clamp_min(0.0)
        rows = torch.arange(block.shape[0], device=u.device)
        sq[rows, rows + start] = float("inf")  # exclude u == v (the diagonal)
        parts.append(torch.logsumexp((-t * sq).flatten(), dim=0).reshape(1))
    return (torch.logsumexp(torch.cat(parts), dim=0) - math.log(n * (n - 1))).item()


def geometry_metrics(image: Tensor, text: Tensor, text_to_image: Tensor) -> dict[str, float]:
    """Gap/alignment/uniformity for a paired set: each image once, each caption once.

    Centroids and uniformity use all images and all captions; alignment and positive cosine use
    every (caption, its image) pair. ``uniformity_all`` is over the union of images and captions.
    """
    paired_img = image[text_to_image.long()]
    return {
        "l2": gap_l2(image, text),
        "sq_per_dim": gap_sq_per_dim(image, text),
        "alignment": alignment(paired_img, text),
        "pos_cos": positive_cosine(paired_img, text),
        "uniformity_img": uniformity(image),
        "uniformity_txt": uniformity(text),
        "uniformity_all": uniformity(torch.cat([image, text])),
    }


@dataclass(frozen=True)
class Projection2D:
    """2-D PCA coordinates of images and texts plus the basis (reuse it to plot several models alike)."""

    image: Tensor
    text: Tensor
    mean: Tensor
    components: Tensor  # (2, d)


def pca_2d(image: Tensor, text: Tensor, basis: Projection2D | None = None) -> Projection2D:
    """Project normalised image and text embeddings onto the top-2 principal axes of their union.

    Pass ``basis`` (an earlier result) to reuse its mean and axes, e.g. to draw "before" and "after" in
    one frame. Axis signs are fixed so the largest-magnitude loading of each axis is positive.
    """
    img, txt = _unit(image), _unit(text)
    if basis is None:
        union = torch.cat([img, txt])
        mean = union.mean(0)
        _, _, vh = torch.linalg.svd(union - mean, full_matrices=False)
        comps = vh[:2]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        comps = comps * signs
    else:
        mean, comps = basis.mean, basis.components
    return Projection2D((img - mean) @ comps.T, (txt - mean) @ comps.T, mean, comps)
