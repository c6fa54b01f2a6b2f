"""Stop (or skip the step) when the loss or the gradient is not finite, before the optimizer applies it."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN / infinite loss or gradient."""


def nonfinite_terms(terms: dict[str, Any] | None) -> list[str]:
    """Names of the scalar loss terms (``loss``, ``loss_rafa``, ...) that are NaN or infinite."""
    bad = []
    for k, v in (terms or {}).items():
        if torch.is_tensor(v) and v.ndim == 0 and v.is_floating_point() and not torch.isfinite(v):
            bad.append(f"{k}={v.item()}")
    return bad


def grads_finite(params: list[torch.Tensor]) -> bool:
    """One reduction over every gradient: the global 2-norm is finite iff every element is (an overflow to inf
    of the norm itself counts as non-finite too, which is what it would do to the step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))


class NonFiniteGuard(Callback):
    """Check the gradient before every optimizer step; on NaN / inf stop the run or skip the step.

    The decision is taken on the gradient, not the local loss: after DDP's all-reduce every rank holds the same
    gradient, so every rank decides alike (a NaN loss on one rank reaches all of them through the all-reduce).
    The message names the step and the loss terms that were not finite on this rank (from the module's
    ``last_loss_terms``).

    Args:
        action: ``stop`` (raise :class:`NonFiniteError`: the run ends with a non-zero exit, nothing is exported,
            checkpoints hold only earlier steps) or ``skip`` (drop this step's gradient: no parameter or
            optimizer-state update; the LR schedule still advances).
        max_consecutive_skips: with ``skip``, stop after this many non-finite steps in a row (a model that became
            NaN would otherwise "train" to the end doing nothing).
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.action={action!r} is not one of stop, skip")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action, self.max_consecutive_skips = action, max_consecutive_skips
        self.skipped_steps = 0
        self._in_a_row = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        terms = None
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: overflowing gradients are routine (the scaler skips those steps and lowers the
            # scale), so decide on the loss terms instead, agreed across ranks (one tiny all-reduce).
            terms = nonfinite_terms(getattr(pl_module, "last_loss_terms", None))
            bad = trainer.strategy.reduce_boolean_decision(bool(terms), all=False)
        else:
            bad = not grads_finite(params)
        if not bad:
            self._in_a_row = 0
            return
        if terms is None:
            terms = nonfinite_terms(getattr(pl_module, "last_loss_terms", None))
        what = ", ".join(terms) if terms else "loss finite on this rank (another rank's was not)"
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, rank {trainer.global_rank})"
        self._in_a_row += 1
        if self.action == "stop" or self._in_a_row > self.max_consecutive_skips:
            why = (
                "" if self.action == "stop" else f" after {self.max_consecutive_skips} skipped steps in a row"
            )
            raise NonFiniteError(
                f"non-finite gradient at {where}{why}; non-finite loss terms: {what}. Nothing is exported; "
                f"checkpoints hold only earlier steps. Lower the learning rate, check the loss weights and "
                f"temperatures, or set callbacks.nonfinite.action=skip to drop such steps"
            )
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient: no update, no state change
        self.skipped_steps += 1
        log.warning(
            "skipping %s: non-finite gradient (%d skipped so far); non-finite loss terms: %s",
            where,
            self.skipped_steps,
            what,
        )
