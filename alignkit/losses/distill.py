"""Distillation from a frozen teacher: HyCD (α-blended hybrid targets; α=0 is self-KD), feature and logit MSE."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.losses.common import CrossRank, check_choice, maybe_normalize, pair_view
from alignkit.losses.contrastive import LogitScaler

KLDirection = Literal["forward", "reverse"]


def _teacher(out: dict, key: str) -> torch.Tensor:
    if key not in out:
        raise KeyError(
            f"this loss needs the frozen teacher's {key!r}; the module must be built with a teacher"
        )
    return out[key]


def kl_rows(
    target: torch.Tensor, log_p: torch.Tensor, direction: KLDirection, eps: float = 1e-12
) -> torch.Tensor:
    """Mean over rows of KL between row distributions: forward KL(target‖p), reverse KL(p‖target)."""
    if direction == "forward":
        kl = torch.xlogy(target, target) - target * log_p
    else:
        kl = log_p.exp() * (log_p - torch.log(target.clamp_min(eps)))
    return kl.sum(dim=1).mean()


class HybridDistillation(nn.Module):
    """HyCD (CLIP-Refine): KL(α·I + (1-α)·softmax(S_tea/T) ‖ softmax(S/T)) in both directions, averaged.

    Defaults follow the released code (``updater/contrastive.py``): raw (unnormalised) features, no logit scale,
    T = 1, forward KL (hybrid target → student), batch-mean, multiplied by T². ``alpha=0`` is plain self-KD,
    ``alpha=1`` is InfoNCE at temperature T. Since the target is a mixture,
    HyCD = α·InfoNCE + (1-α)·KD + const (tested).

    The teacher's similarity uses the same normalisation and temperature; with ``logit_scale=model`` the teacher's
    own scale multiplies its logits.
    """

    requires_teacher = True

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        normalize: bool = False,
        logit_scale: Literal["none", "model"] = "none",
        kl_direction: KLDirection = "forward",
        scale_by_t_squared: bool = True,
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_choice("kl_direction", kl_direction, ("forward", "reverse"))
        check_choice("logit_scale", logit_scale, ("none", "model"))
        self.alpha = alpha
        self.temperature = temperature
        self.normalize = normalize
        self.kl_direction, self.scale_by_t_squared, self.cross_rank = (
            kl_direction,
            scale_by_t_squared,
            cross_rank,
        )
        self.scaler = LogitScaler(logit_scale)

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        s = pair_view(
            maybe_normalize(out["image_features"], self.normalize),
            maybe_normalize(out["text_features"], self.normalize),
            self.cross_rank,
        )
        t = pair_view(
            maybe_normalize(_teacher(out, "teacher_image_features"), self.normalize),
            maybe_normalize(_teacher(out, "teacher_text_features"), self.normalize),
            self.cross_rank,
            grad=False,
        )
        s_scale = self.scaler(out) / self.temperature
        t_scale = self.scaler(out, "teacher_logit_scale") / self.temperature
        labels = s.labels()
        terms = []
        for rows, cols, t_rows, t_cols in (
            (s.img_rows, s.txt_cols, t.img_rows, t.txt_cols),
            (s.txt_rows, s.img_cols, t.txt_rows, t.img_cols),
        ):
            log_p = F.log_softmax(s_scale * rows @ cols.T, dim=1)
            with torch.no_grad():
                q = F.softmax(t_scale * t_rows @ t_cols.T, dim=1)
                onehot = F.one_hot(labels, q.shape[1]).to(q.dtype)
                target = self.alpha * onehot + (1.0 - self.alpha) * q
            terms.append(kl_rows(target, log_p, self.kl_direction))
        loss = 0.5 * (terms[0] + terms[1])
        if self.scale_by_t_squared:
            loss = loss * self.temperature**2
        return {"loss": loss, "i2t": terms[0].detach(), "t2i": terms[1].detach()}


class FeatureDistillation(nn.Module):
    """Released ``fd``: mean-reduced MSE between student and teacher features, per modality.

    ``modality_reduction="sum"`` (default) is the released value mse(img, img_t) + mse(txt, txt_t);
    ``"mean"`` averages the two modalities (half of it: port a weight by a factor 2 between the two).
    """

    requires_teacher = True

    def __init__(self, normalize: bool = False, modality_reduction: Literal["sum", "mean"] = "sum") -> None:
        super().__init__()
        check_choice("modality_reduction", modality_reduction, ("sum", "mean"))
        self.normalize = normalize
        self.modality_reduction = modality_reduction

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        n = self.normalize
        li = F.mse_loss(
            maybe_normalize(out["image_features"], n),
            maybe_normalize(_teacher(out, "teacher_image_features"), n),
        )
        lt = F.mse_loss(
            maybe_normalize(out["text_features"], n),
            maybe_normalize(_teacher(out, "teacher_text_features"), n),
        )
        loss = li + lt if self.modality_reduction == "sum" else 0.5 * (li + lt)
        return {"loss": loss, "image": li.detach(), "text": lt.detach()}


class LogitDistillation(nn.Module):
    """Released ``ld``: mean-reduced MSE between the student's and teacher's in-batch image→text logit matrices."""

    requires_teacher = True

    def __init__(
        self,
        normalize: bool = False,
        logit_scale: Literal["none", "model"] = "none",
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.cross_rank = cross_rank
        self.scaler = LogitScaler(logit_scale)

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        n = self.normalize
        s = pair_view(
            maybe_normalize(out["image_features"], n),
            maybe_normalize(out["text_features"], n),
            self.cross_rank,
        )
        t = pair_view(
            maybe_normalize(_teacher(out, "teacher_image_features"), n),
            maybe_normalize(_teacher(out, "teacher_text_features"), n),
            self.cross_rank,
            grad=False,
        )
        s_logits = self.scaler(out) * s.img_rows @ s.txt_cols.T
        t_logits = self.scaler(out, "teacher_logit_scale") * t.img_rows @ t.txt_cols.T
        return {"loss": F.mse_loss(s_logits, t_logits)}
