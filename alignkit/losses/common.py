"""Shared pieces of the loss nodes: the similarity spec and the cross-rank view of a batch.

A loss node is an ``nn.Module`` whose ``forward(out)`` takes the step's output dict and returns named terms plus
the total under ``"loss"``. Keys of ``out`` used by the nodes in this package:

* ``image_features`` / ``text_features``: student embeddings, *unnormalised* (each node normalises if configured);
* ``logit_scale``: the student's exp'd logit scale (open_clip ``model.logit_scale.exp()``), when it has one;
* ``teacher_image_features`` / ``teacher_text_features`` / ``teacher_logit_scale``: frozen teacher outputs;
* ``step``: the global optimisation step (int), for schedules inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from alignkit.core.distributed import all_gather_no_grad, all_gather_with_grad, rank

CrossRank = Literal["local", "gather_local_loss", "gather_global_loss"]
LogitScale = Literal["none", "model", "learnable"]
CROSS_RANK_CHOICES = ("local", "gather_local_loss", "gather_global_loss")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def maybe_normalize(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


@dataclass
class PairView:
    """Rows (the anchors this rank computes the loss for) and columns (the candidates they are scored against).

    ``offset`` is the column index of the first row's positive, so the positives of the rows are
    ``arange(len(rows)) + offset``.
    """

    img_rows: torch.Tensor
    txt_rows: torch.Tensor
    img_cols: torch.Tensor
    txt_cols: torch.Tensor
    offset: int

    def labels(self) -> torch.Tensor:
        return torch.arange(self.img_rows.shape[0], device=self.img_rows.device) + self.offset


def pair_view(img: torch.Tensor, txt: torch.Tensor, cross_rank: CrossRank, *, grad: bool = True) -> PairView:
    """Arrange a local batch for an in-batch (B x B') loss under the chosen cross-rank semantics.

    * ``local``: every rank scores its own batch only (negatives = local batch).
    * ``gather_local_loss`` (open_clip's ``local_loss=True``): rows are the local samples, columns the batch
      gathered from every rank *with gradient*. With DDP's gradient averaging the update equals that of the loss on
      the global batch at 1/world of the logits memory.
    * ``gather_global_loss``: rows and columns are the gathered batch; every rank computes the full global loss.

    Gathering assumes the same per-rank batch size, which the data pipeline guarantees (remainders are dropped).
    """
    check_choice("cross_rank", cross_rank, CROSS_RANK_CHOICES)
    if cross_rank == "local":
        return PairView(img, txt, img, txt, 0)
    gather = all_gather_with_grad if grad else all_gather_no_grad
    img_all, txt_all = gather(img), gather(txt)
    if cross_rank == "gather_global_loss":
        return PairView(img_all, txt_all, img_all, txt_all, 0)
    return PairView(img, txt, img_all, txt_all, rank() * img.shape[0])


@runtime_checkable
class KnowsRunLength(Protocol):
    """A loss node whose schedule is a fraction of the run: the training module tells it the run's optimizer steps
    when the optimizers are configured (fit start, and again on resume: the same number, so the same schedule)."""

    def set_run_steps(self, total: int) -> None: ...
