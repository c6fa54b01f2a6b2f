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


class NanLossOnRankAtStep(Callback):
    """Multiply the loss by NaN on rank ``rank`` only, at ``step``: the other ranks' losses stay finite, so only
    DDP's gradient all-reduce can tell them about it (unlike NaN images, which gathered losses would spread)."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_fit_start(self, trainer, pl_module) -> None:
        def poison(module, args, terms):
            if pl_module.training and (trainer.global_step, trainer.global_rank) == (self.step, self.rank):
                return {**terms, "loss": terms["loss"] * float("nan")}
            return None

        pl_module.loss.register_forward_hook(poison)


class RecordParams(Callback):
    """Append, before training and after every training batch, a digest of this rank's trainable parameters to
    ``<dirpath>/params_rank<r>.jsonl``: the SHA-256 of their bytes (bit-identical or not), whether all are finite,
    and the largest AdamW ``step`` in the optimizer state (how many updates the optimizer applied)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def _write(self, trainer, pl_module) -> None:
        import hashlib

        import torch

        flat = torch.cat([p.detach().reshape(-1).cpu() for p in pl_module.parameters() if p.requires_grad])
        state = trainer.optimizers[0].state.values() if trainer.optimizers else []
        line = {
            "step": trainer.global_step,
            "sha": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            "finite": bool(torch.isfinite(flat).all()),
            "optimizer_steps": max((int(s["step"]) for s in state if "step" in s), default=0),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with (self.dirpath / f"params_rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, pl_module)


def assert_interrupted_run(run: Path, sig: str, step: int) -> None:
    """A run a signal stopped outside SLURM: summary says so (not requeued), last.ckpt at ``step``, no export,
    the report marked interrupted."""
    import torch

    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and summary["interrupted_by"] == sig and not summary["requeued"]
    assert summary["global_step"] == step
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == step
    assert not (run / "open_clip").exists()  # no export of a half-trained model
    report = (run / "report.md").read_text()
    assert (
        report.startswith("# Evaluation report (interrupted)")
        and f"INTERRUPTED by {sig} at step {step}" in report
    )
