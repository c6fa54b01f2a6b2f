"""Step/time-based checkpointing that also writes the final state."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from alignkit.core.checkpoint import prune_step_checkpoints


# Lightning 2.6.6 checked: ModelCheckpoint has no public hook for "save last now" nor "after a step save" (the
# save_top_k pruning by directory), so this subclass uses _save_last_checkpoint, _monitor_candidates,
# _last_global_step_saved and _save_none_monitor_checkpoint (allowlisted in tests/test_private_access.py).
class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every N steps / minutes, ``last.ckpt``) plus a ``last.ckpt`` after the final
    optimizer step, so the final weights are on disk even when ``max_steps`` is not a multiple of N.

    The final save happens inside the last batch's hooks, like every other step checkpoint, so the saved loop
    state is a mid-loop state that resumes cleanly (a save from ``on_train_end`` would record a finished loop).
    Writes are atomic when the trainer uses :class:`alignkit.core.checkpoint.AtomicCheckpointIO` (the default preset).
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if final and self.save_last and self.dirpath and trainer.global_step != self._last_global_step_saved:
            # Lightning's own last-checkpoint path: it records last_model_path and that `last` was saved, so its
            # on_train_end does not write a second full copy (last-v1.ckpt) next to this one.
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After the restore of a resumed run: step files of a later step than the resumed one come from a killed
        # attempt that got further (this run writes those steps again; left in place, Lightning would save the new
        # ones as -v1 next to them). A fresh start leaves an existing directory alone.
        resumed = trainer.ckpt_path is not None
        if resumed and trainer.is_global_zero and self.save_top_k > 0 and self.dirpath and self.step_prefix():
            prune_step_checkpoints(self.dirpath, self.step_prefix(), self.save_top_k, trainer.global_step)

    # A checkpoint another callback wrote for this step (PreemptionCheckpoint's last.ckpt at a signal): the
    # epoch-end and train-end saves of that step are skipped. Without this, Lightning's on_train_end would write
    # last.ckpt again after the stop, with a loop state that a resume reads as a finished epoch.
    saved_elsewhere_step: int | None = None

    def mark_saved_elsewhere(self, step: int) -> None:
        self.saved_elsewhere_step = step

    def _saved_elsewhere(self, trainer: L.Trainer) -> bool:
        return self.saved_elsewhere_step is not None and self.saved_elsewhere_step == trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved_elsewhere(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved_elsewhere(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saved_elsewhere(trainer):
            super().on_train_end(trainer, pl_module)

    def step_prefix(self) -> str:
        """The fixed start of the step files' names (``step`` for ``step{step:07d}``); empty: no pruning."""
        return (self.filename or "").split("{")[0]

    def _save_none_monitor_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_none_monitor_checkpoint(trainer, monitor_candidates)
        # save_top_k by directory, not only by Lightning's in-memory record: that record comes from the checkpoint
        # this attempt resumed, so step files a killed attempt wrote after it would stay forever.
        if trainer.is_global_zero and self.save_top_k > 0 and self.dirpath and self.step_prefix():
            prune_step_checkpoints(self.dirpath, self.step_prefix(), self.save_top_k, trainer.global_step)
