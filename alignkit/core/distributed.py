"""Rank-aware helpers shared by losses, data and evaluation.

Everything here degrades to the identity when no process group is initialised, so the same code path runs on one
CPU and on a multi-node job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

try:
    # torch >= 2.10: a functional all-gather with autograd (backward: reduce-scatter with sum);
    # torch.distributed.nn.functional.all_gather is deprecated in its favour
    from torch.distributed._functional_collectives import all_gather_single as _all_gather_single
except ImportError:  # older torch, or a build without distributed support
    _all_gather_single = None


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    Why with grad: the backward of ``torch.distributed.nn.all_gather`` sums the incoming gradients of each slice
    over ranks and routes them to the owner. A loss evaluated on rank r over the gathered batch therefore sends
    gradient into the features of every other rank; DDP's gradient averaging then makes the update equal to the
    single-process update on the concatenated batch (tested in tests/test_distributed.py).
    """
    if not is_dist() or world_size() == 1:
        return x
    if _all_gather_single is not None:
        return _all_gather_single(x.contiguous(), 0, dist.group.WORLD)
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no autograd; for teacher outputs and metrics)."""
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
