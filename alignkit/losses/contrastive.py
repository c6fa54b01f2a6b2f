"""Symmetric InfoNCE (CLIP loss) with every hidden choice explicit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.losses.common import CrossRank, LogitScale, check_choice, maybe_normalize, pair_view


class LogitScaler(nn.Module):
    """Multiplier applied to a similarity matrix: none (1), the model's own ``logit_scale``, or a new learnable one.

    ``learnable`` stores log(scale) initialised at ``log(init_logit_scale)`` and clamps the scale at
    ``max_logit_scale`` (CLIP's 100).
    """

    def __init__(
        self,
        logit_scale: LogitScale = "model",
        init_logit_scale: float = 100.0,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        check_choice("logit_scale", logit_scale, ("none", "model", "learnable"))
        self.mode = logit_scale
        self.max_logit_scale = max_logit_scale
        if logit_scale == "learnable":
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def forward(self, out: dict, key: str = "logit_scale") -> torch.Tensor | float:
        if self.mode == "none":
            return 1.0
        if self.mode == "learnable":
            return self.log_scale.exp().clamp(max=self.max_logit_scale)
        if key not in out:
            raise KeyError(
                f"logit_scale='model' but the model produced no {key!r}; use logit_scale=none or learnable"
            )
        return out[key]


class InfoNCE(nn.Module):
    """Symmetric InfoNCE: ½[CE(s·I·Tᵀ/τ, diag) + CE(s·T·Iᵀ/τ, diag)].

    Args:
        normalize: L2-normalise features first (cosine logits). The released CLIP-Refine contrastive baseline uses
            raw features; standard CLIP fine-tuning normalises.
        logit_scale: ``model`` (open_clip's learnable scale, default), ``learnable`` (a new one owned by the loss,
            initialised at ``init_logit_scale``; the released CLIP-Refine baseline uses 100), or ``none``.
        temperature: fixed τ dividing the logits (1.0 when a scale is used; e.g. 0.05 with ``logit_scale=none`` is
            STRUCTURE's fixed-temperature InfoNCE).
        cross_rank: see :func:`alignkit.losses.common.pair_view`.
    """

    requires_teacher = False

    def __init__(
        self,
        normalize: bool = True,
        logit_scale: LogitScale = "model",
        temperature: float = 1.0,
        init_logit_scale: float = 100.0,
        max_logit_scale: float = 100.0,
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.normalize = normalize
        self.temperature = temperature
        self.cross_rank = cross_rank
        self.scaler = LogitScaler(logit_scale, init_logit_scale, max_logit_scale)

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        img = maybe_normalize(out["image_features"], self.normalize)
        txt = maybe_normalize(out["text_features"], self.normalize)
        view = pair_view(img, txt, self.cross_rank)
        scale = self.scaler(out) / self.temperature
        labels = view.labels()
        logits_i2t = scale * view.img_rows @ view.txt_cols.T
        logits_t2i = scale * view.txt_rows @ view.img_cols.T
        loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        return {"loss": loss, "logit_scale": torch.as_tensor(scale).detach()}
