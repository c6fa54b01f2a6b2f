"""Stop (or skip the step) when the loss or the gradient is not finite, before the optimizer applies it."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from alignkit.core.status import RunStatus

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN / infinite loss or gradient."""


def nonfinite_terms(terms: dict[str, Any] | None) -> list[str]:
    """Names of the scalar loss terms (``loss``, ``loss_rafa``, ...) that are NaN or infinite.

    Reads every term on the host: called only where the guard has already decided on the host (``action=skip``,
    fp16 loss scaling), never on the default ``stop`` path."""
    bad = []
    for k, v in (terms or {}).items():
        if torch.is_tensor(v) and v.ndim == 0 and v.is_floating_point() and not math.isfinite(float(v)):
            bad.append(f"{k}={float(v)}")
    return bad


def grads_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """One fused reduction over every gradient, left on the device: the global 2-norm is finite iff every
    element is (an overflow to inf of the norm itself counts as non-finite too, which is what it would do to the
    step). A 0-d bool tensor; ``True`` when no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def _planned_steps(trainer: L.Trainer) -> int:
    """Optimizer steps the run plans (``trainer.max_steps`` or the epochs' batches), at least 1."""
    planned = getattr(trainer, "estimated_stepping_batches", None)
    if not isinstance(planned, int | float) or planned == float("inf") or planned <= 0:
        planned = getattr(trainer, "max_steps", -1)
    return max(1, int(planned)) if isinstance(planned, int | float) and planned > 0 else 1


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
        max_skip_fraction: with ``skip``, stop once more than ``max(1, max_skip_fraction x planned steps)`` steps
            were skipped in all (the ceiling is at least one step, so a 6-step smoke run may skip one; a run that
            skips most of its steps must not exit 0 and export an untrained model).
    """

    def __init__(
        self, action: str = "stop", max_consecutive_skips: int = 10, max_skip_fraction: float = 0.01
    ) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.action={action!r} is not one of stop, skip")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(
                f"callbacks.nonfinite.max_skip_fraction must be in [0, 1], got {max_skip_fraction}"
            )
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.max_skip_fraction = max_skip_fraction
        self.status = RunStatus()  # skipped steps are reported here (build_run attaches the run's status)
        self._in_a_row = 0
        self._first_bad: torch.Tensor | None = None  # device-side: first non-finite step, -1 while none
        self._bad_terms: dict[str, torch.Tensor] = {}
        self._epochs: dict[int, int] = {}
        self._checked_at = -1

    def attach_status(self, status: RunStatus) -> None:
        """Report skipped steps into ``status`` (the run's, from :func:`alignkit.run.build.build_run`)."""
        self.status = status

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (``action=skip``), as reported into the run status."""
        return self.status.skipped_steps

    # ----- action=stop: decided on the device, read at log steps, checkpoints and the end of training -----
    def _watch_on_device(
        self, trainer: L.Trainer, pl_module: L.LightningModule, params: list[torch.Tensor]
    ) -> None:
        """Record, without reading anything back, the first step whose gradient is not finite and the loss terms
        of that step. One fused norm over every gradient (``_foreach_norm``) and a few scalar ``torch.where``."""
        if not any(p.grad is not None for p in params):
            return
        ok = grads_finite(params)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=ok.device)
        first_now = ~ok & (self._first_bad < 0)
        step = trainer.global_step
        self._first_bad = torch.where(first_now, torch.full_like(self._first_bad, step), self._first_bad)
        for k, v in (getattr(pl_module, "last_loss_terms", None) or {}).items():
            if torch.is_tensor(v) and v.ndim == 0 and v.is_floating_point():
                kept = self._bad_terms.get(k, torch.zeros((), dtype=torch.float32, device=v.device))
                self._bad_terms[k] = torch.where(first_now, v.detach().float(), kept)
        self._epochs[step] = trainer.current_epoch

    def _raise_if_a_step_was_not_finite(self, trainer: L.Trainer) -> None:
        """The one host read of the device-side record (a log step, a checkpoint, the end of training): raise
        :class:`NonFiniteError` naming the first non-finite step, else forget the steps seen so far."""
        if self._first_bad is None:
            return
        bad = int(self._first_bad)  # host read, at a log step / checkpoint / end only
        if bad < 0:
            self._epochs.clear()
            return
        terms = [f"{k}={float(v)}" for k, v in self._bad_terms.items() if not math.isfinite(float(v))]
        what = ", ".join(terms) if terms else "loss finite on this rank (another rank's was not)"
        where = f"step {bad} (epoch {self._epochs.get(bad, '?')}, rank {trainer.global_rank})"
        raise NonFiniteError(
            f"non-finite gradient at {where}; non-finite loss terms: {what}. Noticed at step "
            f"{trainer.global_step} (the check runs at log steps, checkpoints and the end of training); nothing "
            f"is exported and no checkpoint of a later step is written. Lower the learning rate, check the loss "
            f"weights and temperatures, or set callbacks.nonfinite.action=skip to drop such steps"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, n = trainer.global_step, trainer.log_every_n_steps
        logs = (n > 0 and step % n == 0) or (trainer.max_steps > 0 and step >= trainer.max_steps)
        if logs and step != self._checked_at:
            self._checked_at = step
            self._raise_if_a_step_was_not_finite(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._raise_if_a_step_was_not_finite(trainer)  # before the file is written: no later step is kept

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_a_step_was_not_finite(trainer)  # before train() exports

    def skip_ceiling(self, trainer: L.Trainer) -> int:
        """Most steps a ``skip`` run may drop: ``max(1, floor(max_skip_fraction x planned steps))``."""
        return max(1, int(self.max_skip_fraction * _planned_steps(trainer)))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        terms = None
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: overflowing gradients are routine (the scaler skips those steps and lowers the
            # scale), so decide on the loss terms instead, agreed across ranks (one tiny all-reduce; the scaler
            # itself reads its found-inf flag on the host every step anyway).
            terms = nonfinite_terms(getattr(pl_module, "last_loss_terms", None))
            bad = trainer.strategy.reduce_boolean_decision(bool(terms), all=False)
        elif self.action == "stop":
            self._watch_on_device(
                trainer, pl_module, params
            )  # decided at the next log step / checkpoint / end
            return
        else:
            # skip: dropping exactly this step's update (no parameter, no optimizer-state change) needs the
            # decision before the optimizer runs: one host read per step (here), the price of action=skip.
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
        ceiling = self.skip_ceiling(trainer)
        if self.skipped_steps + 1 > ceiling:
            raise NonFiniteError(
                f"non-finite gradient at {where}: {self.skipped_steps + 1} skipped steps exceed the ceiling of "
                f"{ceiling} ({self.max_skip_fraction:g} of the run's {_planned_steps(trainer)} steps, "
                f"callbacks.nonfinite.max_skip_fraction); non-finite loss terms: {what}. Nothing is exported. "
                f"Lower the learning rate, check the loss weights and temperatures, or raise "
                f"callbacks.nonfinite.max_skip_fraction"
            )
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient: no update, no state change
        self.status.skipped_steps += 1
        log.warning(
            "skipping %s: non-finite gradient (%d skipped so far); non-finite loss terms: %s",
            where,
            self.skipped_steps,
            what,
        )
