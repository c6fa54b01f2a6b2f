"""Weighted sum of loss nodes with optional per-term weight schedules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from alignkit.losses.common import check_choice


class WeightSchedule:
    """λ(step) for one term: ``constant``, ``linear_warmup`` (0 → λ over ``steps``) or ``linear_decay`` (λ → 0).

    ``linear_warmup`` is STRUCTURE's λ·min(1, t/T_warm); ``linear_decay`` is CLIP-Refine's ``regularization_decay``
    (λ·(1 − t/T), clamped at 0), with ``steps`` usually the run's total steps.
    """

    def __init__(
        self, kind: Literal["constant", "linear_warmup", "linear_decay"] = "constant", steps: int = 0
    ) -> None:
        check_choice("schedule kind", kind, ("constant", "linear_warmup", "linear_decay"))
        if kind != "constant" and steps <= 0:
            raise ValueError(f"schedule {kind} needs steps > 0, got {steps}")
        self.kind = kind
        self.steps = steps

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        frac = min(1.0, max(0, step) / self.steps)
        return frac if self.kind == "linear_warmup" else 1.0 - frac


class WeightedLoss(nn.Module):
    """L = Σ_k λ_k(step) · L_k over named loss nodes.

    Returns ``loss`` (the total), ``loss_<name>`` for each term's own total, ``<name>_<key>`` for each term's extra
    diagnostics, and ``weight_<name>`` for scheduled weights. A term whose weight is a constant 0 is not computed
    (the released CLIP-Refine code computes InfoNCE and multiplies it by 0; the result is the same).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        schedules: Mapping[str, Mapping] | None = None,
        **terms: nn.Module,
    ) -> None:
        """Terms are keyword arguments (``WeightedLoss(rafa=RandomFeatureAlignment(), hycd=...)``), so a config
        override reads ``loss.hycd.alpha=0.3``; a weight defaults to 1."""
        super().__init__()
        if not terms:
            raise ValueError("WeightedLoss needs at least one term")
        weights = dict(weights or {})
        unknown = (set(weights) | set(schedules or {})) - set(terms)
        if unknown:
            raise KeyError(
                f"weights/schedules name terms {sorted(unknown)} that are not in terms {sorted(terms)}"
            )
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {k: float(weights.get(k, 1.0)) for k in terms}
        self.schedules = {k: WeightSchedule(**dict(v)) for k, v in (schedules or {}).items()}

    @property
    def requires_teacher(self) -> bool:
        return any(
            getattr(t, "requires_teacher", False) and self.weights[k] != 0 for k, t in self.terms.items()
        )

    def weight(self, name: str, step: int) -> float:
        sched = self.schedules.get(name)
        return self.weights[name] * (sched.factor(step) if sched else 1.0)

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        step = int(out.get("step", 0))
        result: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            if self.weights[name] == 0.0:
                continue
            w = self.weight(name, step)
            parts = term(out)
            result[f"loss_{name}"] = parts["loss"].detach()
            result.update({f"{name}_{k}": v for k, v in parts.items() if k != "loss"})
            if name in self.schedules:
                result[f"weight_{name}"] = torch.tensor(w)
            contrib = w * parts["loss"]
            total = contrib if total is None else total + contrib
        if total is None:
            raise ValueError("every loss weight is 0: nothing to optimise")
        result["loss"] = total
        return result
