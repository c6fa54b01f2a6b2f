"""Evaluate during training: zero-shot, retrieval and modality gap before training, every N steps, at the end.

Works with any training module that exposes ``eval_interface() -> (model, tokenizer, preprocess)``.
Every rank encodes its strided slice of each eval set and the slices are all-gathered
(:func:`alignkit.eval.encode.encode_eval_set_shard`, :func:`~alignkit.eval.encode.gather_shards`), so no rank
idles at a barrier while rank 0 works; every rank then holds the same metrics, rank 0 logs them and writes the
files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from alignkit.core.status import RunStatus
from alignkit.data.evalsets import EvalSet
from alignkit.eval.recorder import FIRST_EMBEDDINGS_FILE, EvalRecorder, build_evalsets, headline

__all__ = ["FIRST_EMBEDDINGS_FILE", "EvaluationCallback", "build_evalsets"]

log = logging.getLogger(__name__)


class EvaluationCallback(Callback):
    """Evaluate ``evalsets`` at step 0, every ``every_n_steps`` optimizer steps, and after the last step.

    Args:
        evalsets: name -> eval set (:class:`ClassificationSet` / :class:`RetrievalSet`); the name is used in
            the metric keys ``val/zs/<name>/top1``, ``val/ret/<name>/i2t_r@1``, ``val/gap/<name>/l2``.
            Empty or None: the callback does nothing.
        every_n_steps: evaluate when ``global_step`` is a multiple of this; 0 turns periodic evaluation off.
        at_start / at_end: evaluate before the first step / after the last one.
        batch_size: per-rank encoding batch size.
        plot_set: the set drawn in ``embeddings.png`` (default: the first retrieval set, else the first set).
        output_dir: where ``metrics.json``, ``report.md`` and ``embeddings.png`` go (default: the trainer's
            ``default_root_dir``).
        prefix: metric-name prefix for the loggers and ``metrics.json``.

    Metrics are also put into ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="val/zs/x/top1")``
    works). A resumed run reloads ``metrics.json`` and drops entries after the resume step, whose weights
    were never checkpointed.
    """

    def __init__(
        self,
        evalsets: Mapping[str, EvalSet] | None = None,
        every_n_steps: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        batch_size: int = 64,
        plot_set: str | None = None,
        output_dir: str | None = None,
        prefix: str = "val/",
    ) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.recorder = EvalRecorder(evalsets, batch_size=batch_size, plot_set=plot_set, prefix=prefix)
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.at_end = at_end
        self.output_dir = Path(output_dir) if output_dir else None
        self._last_step: int | None = None
        # Read at the end: was the run stopped by a signal? (build_run attaches the run's status.)
        self.status = RunStatus()

    def attach_status(self, status: RunStatus) -> None:
        """Read the run's status (from :func:`alignkit.run.build.build_run`), which the preemption callback fills."""
        self.status = status

    @property
    def evalsets(self) -> dict[str, EvalSet]:
        return self.recorder.evalsets

    @property
    def plot_set(self) -> str | None:
        return self.recorder.plot_set

    @property
    def history(self) -> dict[int, dict[str, float]]:
        return self.recorder.history

    @property
    def enabled(self) -> bool:
        return bool(self.evalsets)

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.output_dir or Path(trainer.default_root_dir)

    # ----- hooks -----
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        if step > 0:
            self._restore(trainer, step)
        if self.at_start and step not in self.history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs several times per optimizer step: evaluate once.
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        if self.enabled and due and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        # A run stopped by a signal (preemption callback) is not at its end: no "final" evaluation (the grace
        # time before the kill is short) and the report says it is interrupted.
        stopped = self.status.preempted
        if self.at_end and not stopped and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            by = (self.status.interrupted_by or "a signal") if stopped else None
            self.write_report(trainer, interrupted_by=by)

    # ----- work -----
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate every set now (all ranks), record, log and write ``metrics.json``; returns the metrics."""
        step = trainer.global_step
        model, tokenizer, preprocess = pl_module.eval_interface()
        first_before = self.recorder.first
        metrics = self.recorder.evaluate(
            model, tokenizer, preprocess, step, device=pl_module.device, precision=str(trainer.precision)
        )
        self._last_step = step
        # Every rank holds the same values (gathered), so monitors agree across ranks.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            out = self._dir(trainer)
            if first_before is None and self.recorder.first is not None:
                self.recorder.save_first_embeddings(out)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
            self.recorder.save_history(out)
            log.info("step %d: %s", step, headline(metrics))
        return metrics

    def write_report(self, trainer: L.Trainer, interrupted_by: str | None = None) -> None:
        out = self._dir(trainer)
        details = {"run directory": str(out)}
        if interrupted_by:
            details = {
                "status": f"INTERRUPTED by {interrupted_by} at step {trainer.global_step}: not the final model "
                "(last.ckpt written; resume with ckpt_path=auto)",
                **details,
            }
        title = "Evaluation report (interrupted)" if interrupted_by else "Evaluation report"
        log.info("wrote %s", self.recorder.write_report(out, details, title=title))

    def _restore(self, trainer: L.Trainer, step: int) -> None:
        """Resumed run: keep the history up to the resume step and the first step's embeddings."""
        self.recorder.restore(self._dir(trainer), step)
        self._last_step = step if step in self.history else None
