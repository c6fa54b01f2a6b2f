"""Preemption / time-limit handling: signal → atomic ``last.ckpt`` at the next batch boundary → requeue → exit.

Why not checkpoint inside the signal handler (Lightning's SLURM auto-requeue does): a handler runs between two
bytecodes, possibly in the middle of an optimizer step, and only on the ranks that got the signal. Here the
handler only records the signal; at the end of the current batch every rank agrees (one tiny all-reduce) and they
save together a checkpoint that is exactly like a step checkpoint, so the resumed run continues bit-identically.

Requeue has exactly one owner (see docs/distributed.md):

* ``sbatch`` (``scripts/slurm/train.sbatch``): this callback runs ``scontrol requeue`` on SIGUSR1 (sent by
  ``#SBATCH --signal=USR1@N`` or ``scancel -s USR1``). Lightning's own SLURM auto-requeue is switched off
  (:func:`alignkit.run.cluster.trainer_plugins`), and :func:`alignkit.run.build.build_run` refuses to start
  a run where it would be on (:func:`alignkit.run.cluster.check_one_requeue_owner`).
* Hydra's submitit launcher: submitit owns the requeue (its SIGUSR2 handler). This callback intercepts SIGUSR2,
  saves at the batch boundary and stops training; once the run has wound down (every callback's hooks for that
  batch, loggers finalised, the run summary written) it calls submitit's handler, which dumps the job, runs
  ``scontrol requeue`` and exits the process. ``alignkit.run.train`` makes that call itself after writing the
  summary (through the run status, :meth:`alignkit.core.status.RunStatus.hand_over`); elsewhere it happens in this
  callback's ``teardown``.
* SIGTERM (scancel, the scheduler's own preemption, the end of the time limit) only saves: a user's ``scancel``
  must not come back, and a scheduler that preempts with requeue brings the job back by itself.

The requeued job composes the same run directory (keyed on the SLURM job id), ``ckpt_path=auto`` finds
``last.ckpt``, the data loader skips the batches already trained on, and the wandb id file keeps the logger run.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from alignkit.core.checkpoint import RNG_SECTION, read_rng_section, rng_section
from alignkit.core.status import RunStatus

log = logging.getLogger(__name__)
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
REQUEUE_SIGNALS_NUM = (signal.SIGUSR1, signal.SIGUSR2)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else SLURM_JOB_ID."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` when a signal arrives, then requeue (or hand over to submitit) and stop.

    Args:
        signals: signal names to handle. SIGUSR1: alignkit's sbatch path; SIGUSR2: submitit's; SIGTERM: save only.
        requeue: ``auto`` (chain to a Python handler that was already installed for the signal — submitit's —
            else ``scontrol requeue`` when running under SLURM), ``scontrol``, ``chain`` or ``none``.
        dirpath: where ``last.ckpt`` goes; default: the ModelCheckpoint callback's folder.
        save_rng: store every rank's torch / numpy / python RNG states (restored on resume).
    """

    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT"),
        requeue: str = "auto",
        dirpath: str | None = None,
        save_rng: bool = True,
    ) -> None:
        if requeue not in ("auto", "scontrol", "chain", "none"):
            raise ValueError(f"requeue={requeue!r} is not one of auto, scontrol, chain, none")
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.requeue = requeue
        self.dirpath = dirpath
        self.save_rng = save_rng
        self.received: int | None = None
        # What the run reports (preempted, the signal's name, requeued, the pending hand-over): build_run attaches
        # the run's one status; a callback used on its own keeps its own.
        self.status = RunStatus()
        self._previous: dict[int, Any] = {}
        self._original: dict[int, Any] = {}  # kept after teardown (see setup)
        self._pid = os.getpid()
        self._rng_to_restore: list | None = None
        self._pending: tuple[Any, int] | None = None  # (submitit's handler, signal) once preempted

    def attach_status(self, status: RunStatus) -> None:
        """Report into ``status`` (the run's, from :func:`alignkit.run.build.build_run`)."""
        self.status = status

    # ----- signals -----
    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process handles it
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the batch boundary
        if (
            self.received is None or signum in REQUEUE_SIGNALS_NUM
        ):  # a requeue signal wins over SIGTERM / SIGINT
            self.received = signum
        log.warning("received %s: checkpointing at the end of this batch", signal.Signals(signum).name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: no preemption signal handlers installed")
            return
        for s in self.signals:
            prev = signal.getsignal(s)
            # A handler left by an earlier run in this process (Lightning's teardown restores the handlers it found,
            # ours included) is not a requeue owner: look through it to what it had replaced.
            while isinstance(getattr(prev, "__self__", None), PreemptionCheckpoint):
                prev = prev.__self__._original.get(s, signal.SIG_DFL)
            self._previous[s] = self._original[s] = prev
            signal.signal(s, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for s, h in self._previous.items():
                if signal.getsignal(s) == self._handler and h is not None:
                    signal.signal(s, h)
        self._previous = {}
        # Deferred: the caller hands over itself (alignkit.run.train, after writing the summary).
        if not self.status.defer_handover:
            self.status.hand_over()

    def hand_over(self) -> None:
        """Call the requeue owner's handler (submitit's: requeue + ``sys.exit``) if preemption chose to chain.

        Deferred to the end of the run, not called at the batch boundary: submitit's handler exits the process,
        which in the middle of a batch's hooks would skip the remaining callbacks (their record of that step,
        logger flushes) and leave other ranks in Lightning's teardown without rank 0."""
        if self._pending is None:
            return
        previous, signum = self._pending
        self._pending = None
        log.warning(
            "handing over to the previous %s handler (submitit's requeue)", signal.Signals(signum).name
        )
        previous(signum, None)  # submitit: checkpoint() + scontrol requeue + sys.exit on rank 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning (2.6.6 checked) installs its own SIGTERM handler after on_fit_start, chaining ours, and then raises
        # SIGTERMException (a SystemExit without a code, so exit 0) at the batch boundary: the run would end with no
        # summary and no report. No public switch turns that off, so during fit this callback owns SIGTERM again (its
        # handler saves and stops like for the other signals); Lightning's teardown restores what it had found.
        on_main = threading.current_thread() is threading.main_thread()
        if signal.SIGTERM in self.signals and on_main and signal.getsignal(signal.SIGTERM) != self._handler:
            signal.signal(signal.SIGTERM, self._handler)
        if self._rng_to_restore is not None:
            # after the model, optimizer and loops are restored: nothing consumes RNG between here and the 1st batch
            _set_rng_state(self._rng_to_restore[trainer.global_rank])
            self._rng_to_restore = None

    # ----- the batch boundary -----
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        local = self.received is not None
        # Every rank must save at the same step (saving is collective): any rank's signal stops them all.
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        signum = self.received if local else signal.SIGTERM
        path = self._last_path(trainer)
        log.warning(
            "preempted (%s): writing %s at step %d", signal.Signals(signum).name, path, trainer.global_step
        )
        trainer.save_checkpoint(str(path))
        for cb in trainer.checkpoint_callbacks:  # RunCheckpoint: no second save of this step after the stop
            if callable(getattr(cb, "mark_saved_elsewhere", None)):
                cb.mark_saved_elsewhere(trainer.global_step)
        self.status.record_stop(signal.Signals(signum).name)
        trainer.should_stop = True
        if signum in REQUEUE_SIGNALS_NUM:
            self._requeue(trainer, signum)

    def _last_path(self, trainer: L.Trainer) -> Path:
        cb = trainer.checkpoint_callback
        folder = self.dirpath or (getattr(cb, "dirpath", None) if cb is not None else None)
        folder = folder or str(Path(trainer.default_root_dir) / "checkpoints")
        return Path(folder) / "last.ckpt"

    def _requeue(self, trainer: L.Trainer, signum: int) -> None:
        previous = self._previous.get(signum)
        mode = self.requeue
        if mode == "auto":
            if callable(previous):
                mode = "chain"
            elif slurm_job_id() is not None:
                mode = "scontrol"
            else:
                mode = "none"
        if mode == "chain":
            if not callable(previous):
                raise RuntimeError(
                    f"requeue=chain but no handler was installed for {signal.Signals(signum).name}"
                )
            self._pending = (previous, signum)  # called once the run has wound down (hand_over)
            self.status.handover = self.hand_over
            self.status.requeued = True
        elif mode == "scontrol" and trainer.is_global_zero:
            job = slurm_job_id()
            if job is None or not re.fullmatch(r"[0-9_]+", job):
                log.error("cannot requeue: no SLURM job id in the environment")
                return
            rc = subprocess.call(["scontrol", "requeue", job])
            (log.warning if rc == 0 else log.error)("scontrol requeue %s -> exit code %d", job, rc)
            self.status.requeued = rc == 0
        elif mode == "scontrol":
            self.status.requeued = True  # rank 0 runs scontrol for the job

    # ----- RNG state in the checkpoint -----
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not self.save_rng:
            return
        state = _rng_state()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            states: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint.setdefault(RNG_SECTION, rng_section(states))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = read_rng_section(checkpoint)
        if self.save_rng and states and len(states) == trainer.world_size:
            self._rng_to_restore = states


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values: the checkpoint stays loadable with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [
        str(kind),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
