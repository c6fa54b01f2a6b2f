"""InfoNCE with progressively softened targets (LightCLIP: Nie et al. 2023, "LightCLIP: Learning Multi-Level
Interaction for Lightweight Vision-Language Models", instance-level alignment with progressive softened labels).

In-batch image-text pairs are not strictly one-to-one (a caption often fits other images of the batch too), so the
one-hot target of each row gives a share ε_t of its mass to the negatives, and ε_t grows over training::

    y_i = (1 − ε_t)·onehot(i) + ε_t·m_i        (m_i: a distribution over the row's columns, see ``mass_to``)
    L   = ½[CE(s·I·Tᵀ/τ, y) + CE(s·T·Iᵀ/τ, y)],   CE(logits, y) = −mean_i Σ_j y_ij log softmax(logits_i)_j

What the paper leaves open is an option here (the paper's exact schedule values were not available to us, so the
defaults are alignkit's and say so):

* ``schedule``: ``linear`` (ε_t = ε_max·min(1, step/softening_steps), default: the progressive ramp) or ``constant``;
* ``max_softening`` ε_max (default 0.1, alignkit's choice); ε = 0 is exactly :class:`InfoNCE` (tested);
* ``mass_to``: where ε goes — ``negatives`` (evenly over the N − 1 negatives, default: "soften the labels of the
  negatives"), ``all`` (evenly over all N columns, positive included: classic label smoothing) or ``similar``
  (over the negatives in proportion to the softmax of the row's own detached logits, so partial matches get more).

Logits follow :class:`InfoNCE` (normalise, logit scale, τ) and so does ``cross_rank``: every row's loss only needs
its own logits, so ``gather_local_loss`` (local rows, gathered columns) averages over ranks to the global loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.losses.common import CrossRank, LogitScale, check_choice, maybe_normalize, pair_view
from alignkit.losses.contrastive import LogitScaler

Schedule = Literal["linear", "constant"]
MassTo = Literal["negatives", "all", "similar"]

__all__ = ["SoftenedInfoNCE", "softened_targets"]


def softened_targets(logits: Tensor, labels: Tensor, eps: float, mass_to: MassTo) -> Tensor:
    """(R, C) target rows: 1 − ε on each row's positive column ``labels[i]``, ε spread by ``mass_to``."""
    n = logits.shape[1]
    onehot = F.one_hot(labels, n).to(logits.dtype)
    if mass_to == "all":
        spread = torch.full_like(logits, 1.0 / n)
    elif mass_to == "negatives":
        spread = (1.0 - onehot) / (n - 1)
    elif mass_to == "similar":
        spread = logits.detach().masked_fill(onehot.bool(), float("-inf")).softmax(dim=1)
    else:
        raise ValueError(f"mass_to={mass_to!r} is not one of ['negatives', 'all', 'similar']")
    return (1.0 - eps) * onehot + eps * spread


class SoftenedInfoNCE(nn.Module):
    """Symmetric InfoNCE against progressively softened targets (module docstring: every option and its default).

    Reads ``out['step']`` (the global optimiser step) while the ``linear`` schedule is ramping; a missing step is an
    error rather than a silent ε = 0.
    """

    requires_teacher = False

    def __init__(
        self,
        max_softening: float = 0.1,
        schedule: Schedule = "linear",
        softening_steps: int = 1000,
        mass_to: MassTo = "negatives",
        normalize: bool = True,
        logit_scale: LogitScale = "model",
        temperature: float = 1.0,
        init_logit_scale: float = 100.0,
        max_logit_scale: float = 100.0,
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        if not 0.0 <= max_softening < 1.0:
            raise ValueError(f"max_softening must lie in [0, 1), got {max_softening}")
        check_choice("schedule", schedule, ("linear", "constant"))
        check_choice("mass_to", mass_to, ("negatives", "all", "similar"))
        if schedule == "linear" and softening_steps <= 0:
            raise ValueError(f"schedule=linear needs softening_steps > 0, got {softening_steps}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.max_softening = max_softening
        self.schedule = schedule
        self.softening_steps = softening_steps
        self.mass_to, self.normalize, self.temperature, self.cross_rank = (
            mass_to,
            normalize,
            temperature,
            cross_rank,
        )
        self.scaler = LogitScaler(logit_scale, init_logit_scale, max_logit_scale)

    def softening(self, step: int | Tensor | None) -> float:
        """ε_t for the global step ``step``."""
        if self.schedule == "constant" or self.max_softening == 0.0:
            return self.max_softening
        if step is None:
            raise KeyError(
                "SoftenedInfoNCE(schedule=linear) needs out['step'] (the global step); pass it or use "
                "schedule=constant"
            )
        return self.max_softening * min(1.0, max(0.0, float(step)) / self.softening_steps)

    def forward(self, out: dict) -> dict[str, Tensor]:
        eps = self.softening(out.get("step"))
        img = maybe_normalize(out["image_features"], self.normalize)
        txt = maybe_normalize(out["text_features"], self.normalize)
        view = pair_view(img, txt, self.cross_rank)
        if view.img_cols.shape[0] < 2:
            raise ValueError("softened InfoNCE needs at least two pairs in the (gathered) batch")
        scale = self.scaler(out) / self.temperature
        labels = view.labels()
        terms = []
        for rows, cols in ((view.img_rows, view.txt_cols), (view.txt_rows, view.img_cols)):
            logits = scale * rows @ cols.T
            target = softened_targets(logits, labels, eps, self.mass_to)
            terms.append(-(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean())
        loss = 0.5 * (terms[0] + terms[1])
        return {
            "loss": loss,
            "softening": torch.tensor(eps, device=loss.device),
            "logit_scale": torch.as_tensor(scale).detach(),
        }
