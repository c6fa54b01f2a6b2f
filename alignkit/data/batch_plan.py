"""How a run's samples become optimizer steps: the one place where the batch arithmetic of a run lives.

``data.batch_size`` is per device. The global batch is per device × devices × nodes (= the trainer's world size) ×
gradient-accumulation steps; the number of loader batches per rank and epoch is the data node's own
``steps_per_epoch(world_size)`` (its ``epoch_rounding``: floor drops the remainder, ceil tops the last batch up).
:func:`alignkit.run.build.build_run` asks the data node once and keeps the answer here; ``train()``, the teacher
precompute script and the benchmarks read it from the built run, and the module logs :meth:`BatchPlan.logged`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


def loader_steps(samples: int, per_device: int, world: int, rounding: Literal["floor", "ceil"]) -> int:
    """Loader batches per rank per epoch: floor (drop the remainder, as the released CLIP-Refine code: 117,104 / 512
    -> 228) or ceil (top the last global batch up) of samples / (per_device x world); at least one, or a clear error."""
    n = samples / (per_device * world)
    steps = math.floor(n) if rounding == "floor" else math.ceil(n)
    if steps < 1:
        raise ValueError(
            f"{samples} samples cannot fill one global batch of {per_device} x {world}; lower data.batch_size or "
            "add data"
        )
    return steps


@dataclass(frozen=True)
class BatchPlan:
    """The batch sizes and epoch length of a run.

    Args:
        per_device: samples per device per loader batch (``data.batch_size``).
        world_size: processes taking part in one step (devices per node × nodes).
        accumulation: loader batches per optimizer step (``trainer.accumulate_grad_batches``).
        samples: samples in one epoch of the data node; ``None`` for a plan made from a batch in hand.
        steps_per_epoch: loader batches per rank per epoch (the data node's rounding); ``None`` likewise.
        epochs: epochs of the run (0: no training step).
    """

    per_device: int
    world_size: int = 1
    accumulation: int = 1
    samples: int | None = None
    steps_per_epoch: int | None = None
    epochs: int = 1

    def __post_init__(self) -> None:
        for name in ("per_device", "world_size", "accumulation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"batch plan: {name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:  # 0 is a run with no training step (e.g. STRUCTURE's training-free CCA heads)
            raise ValueError(f"batch plan: epochs must be >= 0, got {self.epochs}")

    @property
    def global_batch(self) -> int:
        """Samples behind one optimizer step: per device × world size × accumulation."""
        return self.per_device * self.world_size * self.accumulation

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run: ceil(loader batches per epoch / accumulation) per epoch.

        Lightning closes a partial accumulation window at an epoch's end with an optimizer step
        (``_TrainingEpochLoop._should_accumulate``), so an epoch of 13 batches at accumulation 4 is 4 steps, not 3;
        counting floor(batches over all epochs / accumulation) would stop the run before its last batches."""
        if self.steps_per_epoch is None:
            raise ValueError("this batch plan has no epoch length (made from a batch, not from a data node)")
        return self.epochs * -(-self.steps_per_epoch // self.accumulation)

    def logged(self) -> dict[str, float]:
        """What the training module logs every logging step: ``data/batch_per_device`` and ``data/batch_global``."""
        return {
            "data/batch_per_device": float(self.per_device),
            "data/batch_global": float(self.global_batch),
        }
