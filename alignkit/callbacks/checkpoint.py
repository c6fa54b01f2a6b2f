"""Step/time-based checkpointing that also writes the final state."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every N steps / minutes, ``last.ckpt``) plus a ``last.ckpt`` after the final
    optimizer step, so the final weights are on disk even when ``max_steps`` is not a multiple of N.

    The final save happens inside the last batch's hooks, like every other step checkpoint, so the saved loop
    state is a mid-loop state that resumes cleanly (a save from ``on_train_end`` would record a finished loop).
    Writes are atomic when the trainer uses :class:`alignkit.run.checkpointing.AtomicCheckpointIO` (the default preset).
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
