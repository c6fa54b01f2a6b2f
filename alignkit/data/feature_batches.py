"""Batches of cached features under the resumable epoch plan of :mod:`alignkit.data.epochs`.

A batch is an index gather from in-memory tensors (thousands of steps per second on a CPU), so there is no
DataLoader and no worker: :class:`FeatureEpochBatches` is the ``make_loader(plan, epoch, skip)`` of a
:class:`~alignkit.data.epochs.ResumableLoader`, which counts the batches trained on, stores that position in every
checkpoint and skips them on resume. The k-th batch of an epoch is a pure function of (seed, epoch, plan), so a run
killed mid-epoch and resumed trains on exactly the batches of an uninterrupted run.

The epoch's order is STRUCTURE's own rule, kept from the first release of this node so that no result changes:
``torch.randperm(N)`` from a generator seeded with ``seed * 100_003 + epoch``; global batch ``s`` is positions
``[s·B·world, (s+1)·B·world)`` of that order and rank ``r`` takes the ``r``-th slice of ``B`` (ranks interleave
inside each global batch, unlike the contiguous rank ranges of the image-text loader); with ``ceil`` rounding the
order is topped up from its start.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from alignkit.data.epochs import EpochPlan

__all__ = ["FeatureEpochBatches", "epoch_order"]


def epoch_order(num_samples: int, seed: int, epoch: int, needed: int) -> Tensor:
    """The epoch's order of the ``num_samples`` rows, topped up from its start to ``needed`` positions."""
    # 100_003 (a prime) keeps the (seed, epoch) streams apart for any realistic number of epochs.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    if needed > num_samples:
        perm = torch.cat([perm, perm[: needed - num_samples]])
    return perm


class FeatureEpochBatches:
    """Per-rank batches ``{"image_inputs", "text_inputs", "row"}`` of one epoch of cached features.

    ``image`` / ``text``: features of the unique images / captions; ``row_image`` / ``row_text``: for each training
    pair, its row in them (a pair is ``row``, an index into ``row_image``)."""

    def __init__(self, image: Tensor, row_image: Tensor, text: Tensor, row_text: Tensor, seed: int) -> None:
        if len(row_image) != len(row_text):
            raise ValueError(f"{len(row_image)} image rows but {len(row_text)} text rows: not one per pair")
        self.image = image
        self.row_image = row_image
        self.text = text
        self.row_text = row_text
        self.seed = seed

    def __len__(self) -> int:
        """Number of training pairs (``N`` of the plan)."""
        return len(self.row_image)

    def rows(self, plan: EpochPlan, epoch: int) -> list[Tensor]:
        """Pair indices of each of the rank's ``plan.steps`` batches in ``epoch``."""
        bs, world = plan.batch_size, plan.world
        order = epoch_order(len(self), self.seed, epoch, plan.steps * bs * world)
        starts = [(s * world + plan.rank) * bs for s in range(plan.steps)]
        return [order[start : start + bs] for start in starts]

    def __call__(self, plan: EpochPlan, epoch: int, skip: int) -> Iterator[dict[str, Tensor]]:
        """The rank's batches of ``epoch`` after the first ``skip`` (a resumed epoch)."""
        for rows in self.rows(plan, epoch)[skip:]:
            yield {
                "image_inputs": self.image[self.row_image[rows]],
                "text_inputs": self.text[self.row_text[rows]],
                "row": rows,
            }
