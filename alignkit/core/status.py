"""The run-status contract: one object the callbacks report into and the training entry reads.

``alignkit.run.build.build_run`` creates one :class:`RunStatus` per run and hands it to every callback that takes
one (:class:`ReportsStatus`: a public ``attach_status`` setter). The preemption callback reports the stop (signal,
requeue, the deferred hand-over to the requeue owner), the non-finite guard the skipped steps; ``train()`` and the
evaluation callback read them here instead of probing callbacks for attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class RunStatus:
    """What happened to a run, as its callbacks report it.

    Attributes:
        preempted: a signal stopped the run at a batch boundary (``last.ckpt`` written).
        interrupted_by: the name of that signal (``"SIGUSR1"``, ``"SIGTERM"``, ...).
        requeued: the scheduler will run the job again (``scontrol requeue`` succeeded, or submitit's handler is due).
        skipped_steps: optimizer steps skipped for a non-finite gradient.
        defer_handover: the caller calls :meth:`hand_over` itself once the run has wound down (``train()`` does,
            after writing the summary); else the preemption callback does in its ``teardown``.
        handover: the requeue owner's hand-over (submitit's handler: requeue + exit), set by the preemption
            callback when it chose to chain to it; ``None`` when there is nothing to hand over.
    """

    preempted: bool = False
    interrupted_by: str | None = None
    requeued: bool = False
    skipped_steps: int = 0
    defer_handover: bool = False
    handover: Callable[[], None] | None = None

    def record_stop(self, signal_name: str) -> None:
        """A signal stopped the run at a batch boundary."""
        self.preempted = True
        self.interrupted_by = signal_name

    def hand_over(self) -> None:
        """Run the pending hand-over once (submitit's handler exits the process); nothing when none is pending."""
        handover, self.handover = self.handover, None
        if handover is not None:
            handover()


@runtime_checkable
class ReportsStatus(Protocol):
    """A callback that reports into (or reads) the run's :class:`RunStatus`."""

    def attach_status(self, status: RunStatus) -> None: ...
