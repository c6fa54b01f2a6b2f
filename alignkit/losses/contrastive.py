"""Symmetric InfoNCE (CLIP loss) with every hidden choice explicit."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.losses.common import CrossRank, LogitScale, check_choice, maybe_normalize, pair_view


class LogitScaler(nn.Module):
    """Multiplier applied to a similarity matrix: none (1), the model's own ``logit_scale``, or a new learnable one.

    ``learnable`` stores log(scale) initialised at ``log(init_logit_scale)``. It is clamped at ``max_logit_scale``
    only when a cap is given (default none, as in the released CLIP-Refine baseline). A cap equal to the start
    would freeze the scale: in fp32 exp(log 100) rounds above 100, so the clamp is active and passes no gradient.
    """

    def __init__(
        self,
        logit_scale: LogitScale = "model",
        init_logit_scale: float = 100.0,
        max_logit_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_choice("logit_scale", logit_scale, ("none", "model", "learnable"))
        self.mode = logit_scale
        self.max_logit_scale = max_logit_scale
        if logit_scale == "learnable":
            if init_logit_scale <= 0:
                raise ValueError(f"init_logit_scale must be > 0, got {init_logit_scale}")
            log_init = torch.tensor(math.log(init_logit_scale))
            # Compare with the fp32 start as the forward computes it (exp(log 100) rounds to 100.0000076).
            if max_logit_scale is not None and max_logit_scale <= float(log_init.exp()):
                raise ValueError(
                    f"max_logit_scale={max_logit_scale} must exceed init_logit_scale={init_logit_scale}, otherwise "
                    "the clamp is active from the first step and the learnable scale gets no gradient; "
                    "set max_logit_scale=null for no cap"
                )
            self.log_scale = nn.Parameter(log_init)

    def forward(self, out: dict, key: str = "logit_scale") -> torch.Tensor | float:
        if self.mode == "none":
            return 1.0
        if self.mode == "learnable":
            scale = self.log_scale.exp()
            return scale if self.max_logit_scale is None else scale.clamp(max=self.max_logit_scale)
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
        max_logit_scale: optional cap on the ``learnable`` scale (default none: uncapped, as released; open_clip
            caps its own scale at 100). Must exceed ``init_logit_scale``.
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
        max_logit_scale: float | None = None,
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
