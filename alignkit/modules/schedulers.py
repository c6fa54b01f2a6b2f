"""Step-based learning-rate schedules (warm-up + constant / cosine / linear), stepped every optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class LRSchedule:
    """Multiplier on the optimizer's lr: linear warm-up over ``warmup_steps``, then ``constant`` (CLIP-Refine's
    released recipe), ``cosine`` to ``min_lr_ratio`` or ``linear`` to ``min_lr_ratio`` at ``total_steps``.

    ``total_steps`` defaults to the run's total (``trainer.estimated_stepping_batches``)."""

    kind: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def factor(self, step: int, total: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, total - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"scheduler.kind={self.kind!r} is not one of constant, cosine, linear")
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def build(self, optimizer: Optimizer, total_steps: int) -> LambdaLR:
        total = self.total_steps or total_steps
        return LambdaLR(optimizer, lambda step: self.factor(step, total))
