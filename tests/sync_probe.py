"""Count host synchronisations made by alignkit code inside training steps that no logger writes.

``SyncProbe`` (a test-only callback, ``+callbacks.sync.__target_=sync_probe.SyncProbe``) wraps the tensor methods
that move a value to the host — ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``,
``__int__``, and ``to("cpu")`` — for the whole fit, but counts a call only when both hold:

* the step in progress is not a log step (Lightning's loggers write when ``(step + 1) % log_every_n_steps == 0``;
  the final step logs too), from ``on_train_batch_start`` of such a step until the next batch is fetched (the
  module's ``on_before_batch_transfer``, which still reads host-side loader tensors): ``training_step``,
  ``on_before_optimizer_step``, the optimizer step and every ``on_train_batch_end`` are in;
* the Python frame that called the method is in the ``alignkit`` package (torch's and Lightning's own machinery
  calls ``__bool__`` on CPU tensors for reasons of its own; what alignkit adds is what this test guards).

On a GPU each counted call is a stall of the host until the device drains its queue (issue: ~16 ms a step)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

PACKAGE = str(Path(__file__).resolve().parents[1] / "alignkit")
METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class SyncProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out, self.window, self.steps, self.calls = Path(out), False, 0, []
        self._saved: dict[str, object] = {}

    def _count(self, name: str, frame) -> None:
        if self.window and frame.f_code.co_filename.startswith(PACKAGE):
            self.calls.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")

    def _install(self) -> None:
        for name in METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapper(t, *a, __orig=orig, __name=name, **k):
                self._count(__name, sys._getframe(1))
                return __orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        orig_to = torch.Tensor.to
        self._saved["to"] = orig_to

        def to(t, *a, **k):
            dev = k.get("device", a[0] if a else None)
            # ``.to("cpu")`` spelled out is a move to the host; ``.to(device)`` with a variable that is the CPU in
            # this run (rafa.py moves its CPU-seeded references to the features' device) is a host-to-device copy
            # on a GPU, which does not stall the host, so it is not counted.
            if dev == "cpu" or (torch.is_tensor(t) and t.device.type != "cpu" and str(dev).startswith("cpu")):
                self._count("to(cpu)", sys._getframe(1))
            return orig_to(t, *a, **k)

        torch.Tensor.to = to

    def _restore(self) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._saved.clear()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._install()
        before = pl_module.on_before_batch_transfer

        def close_then(batch, dataloader_idx):  # the next batch is being fetched: the step is over
            self.window = False
            return before(batch, dataloader_idx)

        pl_module.on_before_batch_transfer = close_then

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        n, step = trainer.log_every_n_steps, trainer.global_step + 1
        logs = step % n == 0 or (trainer.max_steps > 0 and step >= trainer.max_steps)
        self.window = not logs
        self.steps += self.window

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.window = False

    def teardown(self, trainer, pl_module, stage) -> None:
        self.window = False
        self._restore()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.txt").write_text(f"{self.steps}\n" + "\n".join(self.calls))


def read(out: Path, rank: int = 0) -> tuple[int, list[str]]:
    """(non-log steps watched, the counted calls) that rank ``rank``'s probe wrote."""
    steps, *calls = (out / f"rank{rank}.txt").read_text().split("\n")
    return int(steps), [c for c in calls if c]
