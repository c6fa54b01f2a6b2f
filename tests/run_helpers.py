"""Test-only Lightning callbacks, added to a run with ``+callbacks.NAME._target_=run_helpers.X`` (tests/ on the path)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordKeys(Callback):
    """Append every trained batch's sample keys (a cached-feature batch: its pair rows) to
    ``<dirpath>/keys_rank<r>.jsonl`` (one line per step)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        keys = list(batch["key"]) if "key" in batch else batch["row"].tolist()
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": keys}
        with (self.dirpath / f"keys_rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


class SignalAtStep(Callback):
    """Send ``sig`` to this process when training reaches ``step`` (a deterministic stand-in for SLURM's signal).

    ``once_file``: only signal if this file does not exist yet (then create it), so a resumed run is not signalled
    again."""

    def __init__(self, step: int, sig: str = "SIGUSR1", once_file: str | None = None) -> None:
        self.step, self.sig, self.once_file = step, getattr(signal, sig), once_file

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        if self.once_file:
            if Path(self.once_file).exists():
                return
            Path(self.once_file).write_text("signalled")
        os.kill(os.getpid(), self.sig)


def signal_at_step(step: int, once_file: str | Path, sig: str = "SIGUSR1") -> list[str]:
    """Overrides that add :class:`SignalAtStep` to a run (signalled once: a resumed run goes on)."""
    return [
        "+callbacks.kill._target_=run_helpers.SignalAtStep",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.sig={sig}",
        f"+callbacks.kill.once_file={once_file}",
    ]


class Sleep(Callback):
    """Sleep after every batch: gives an outside test a window to signal a tiny run mid-epoch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


class NanBatchAtStep(Callback):
    """Fill the images of the batch trained at ``step`` with NaN (a stand-in for a numerically broken step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["image"].fill_(float("nan"))


class _KillWhenPickled:
    def __reduce__(self):
        os.kill(
            os.getpid(), signal.SIGKILL
        )  # torch.save is pickling the checkpoint: die in the middle of the write


class KillDuringSave(Callback):
    """``kill -9`` this process while it writes its ``nth`` checkpoint (counting every save, step and last)."""

    def __init__(self, nth: int) -> None:
        self.nth, self.seen = nth, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.seen += 1
        if self.seen == self.nth:
            checkpoint["zz_kill"] = _KillWhenPickled()  # last key: most of the file is written first
