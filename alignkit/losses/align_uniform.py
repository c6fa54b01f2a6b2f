"""Alignment and uniformity as training objectives (Wang & Isola, ICML 2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere").

Two nodes, meant to sit side by side in :class:`alignkit.losses.WeightedLoss` (``configs/loss/align_uniform.yaml``:
``weights: {align: 1, uniform: 1}``), so each has its own weight and schedule:

* :class:`Alignment`: L_align = E_i ‖f(x_i) − g(y_i)‖₂^α over the positive (image, text) pairs;
* :class:`Uniformity`: L_uniform = log E_{i≠j} exp(−t‖z_i − z_j‖₂²), per modality (averaged) or over the union.

Defaults are the paper's recommended α = 2, t = 2 on L2-normalised features, weights 1 and 1 (the settings of the
authors' reference implementation). The same quantities are reported as metrics by
:mod:`alignkit.metrics.geometry` (``alignment``, ``uniformity``), which always normalise and use α = 2, t = 2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from alignkit.losses.common import CrossRank, check_choice, maybe_normalize
from alignkit.losses.uniformity import log_mean_pair_kernel

UniformOver = Literal["per_modality", "union"]
ModalityReduction = Literal["mean", "sum"]

__all__ = ["Alignment", "Uniformity"]


class Alignment(nn.Module):
    """L_align = mean_i ‖f_i − g_i‖₂^α over the positive pairs of the batch.

    A per-sample mean: each rank's loss is the mean over its own pairs, and with equal per-rank batches the mean of
    the rank losses (what DDP's gradient averaging optimises) is the global mean, so no gather is needed.
    """

    requires_teacher = False

    def __init__(self, alpha: float = 2.0, normalize: bool = True) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.normalize = normalize

    def forward(self, out: dict) -> dict[str, Tensor]:
        img = maybe_normalize(out["image_features"], self.normalize).float()
        txt = maybe_normalize(out["text_features"], self.normalize).float()
        if img.shape != txt.shape:
            raise ValueError(f"alignment needs paired rows, got {tuple(img.shape)} and {tuple(txt.shape)}")
        sq = (img - txt).pow(2).sum(-1)
        # ‖·‖^α as (‖·‖²)^(α/2): α = 2 never takes a square root (whose gradient is undefined at a perfect match)
        dist = sq if self.alpha == 2.0 else sq.clamp_min(1e-12).pow(self.alpha / 2)
        loss = dist.mean()
        return {"loss": loss, "pos_sq_dist": sq.mean().detach()}


class Uniformity(nn.Module):
    """L_uniform = log E_{i≠j} exp(−t‖z_i − z_j‖₂²) (always ≤ 0 on the sphere; lower = more uniform).

    Args:
        t: the kernel's scale (paper: 2).
        normalize: L2-normalise first (the paper's setting; raw features make the loss unbounded below).
        uniform_over: ``per_modality`` (image and text batches separately, then ``modality_reduction``) or
            ``union`` (one set of 2B points: images are also pushed away from captions).
        modality_reduction: ``mean`` (½(L_img + L_txt), default) or ``sum``.
        cross_rank: ``gather_local_loss`` (exact global value and gradient at local-loss memory), ``local`` (each
            rank's own batch) or ``gather_global_loss``; see :func:`alignkit.losses.uniformity.log_mean_pair_kernel`.
    """

    requires_teacher = False

    def __init__(
        self,
        t: float = 2.0,
        normalize: bool = True,
        uniform_over: UniformOver = "per_modality",
        modality_reduction: ModalityReduction = "mean",
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        if t <= 0:
            raise ValueError(f"t must be > 0, got {t}")
        check_choice("uniform_over", uniform_over, ("per_modality", "union"))
        check_choice("modality_reduction", modality_reduction, ("mean", "sum"))
        self.t = t
        self.normalize = normalize
        self.uniform_over = uniform_over
        self.modality_reduction = modality_reduction
        self.cross_rank = cross_rank

    def forward(self, out: dict) -> dict[str, Tensor]:
        img = maybe_normalize(out["image_features"], self.normalize)
        txt = maybe_normalize(out["text_features"], self.normalize)
        if self.uniform_over == "union":
            loss = log_mean_pair_kernel(torch.cat([img, txt]), self.t, self.cross_rank)
            return {"loss": loss}
        u_img = log_mean_pair_kernel(img, self.t, self.cross_rank)
        u_txt = log_mean_pair_kernel(txt, self.t, self.cross_rank)
        loss = u_img + u_txt
        if self.modality_reduction == "mean":
            loss = 0.5 * loss
        return {"loss": loss, "image": u_img.detach(), "text": u_txt.detach()}
