"""AdamW with an explicit kernel choice (``optimizer.impl``).

``torch.optim.AdamW`` has three implementations of the same update: ``fused`` (one CUDA kernel for every
parameter, the fastest on a GPU), ``foreach`` (multi-tensor ops, a handful of launches per step) and the plain
per-parameter loop. PyTorch picks ``foreach`` on CUDA unless told otherwise and never ``fused``; ``auto`` here picks
``fused`` when every parameter lives on a CUDA device and ``foreach`` otherwise (on CPU the multi-tensor path runs
the same maths as the loop without a Python iteration per tensor)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

IMPLS = ("auto", "fused", "foreach", "plain")


def _params(groups: Iterable[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for g in groups:
        out.extend(g["params"] if isinstance(g, dict) else [g])
    return out


def resolve_impl(impl: str, params: list[torch.Tensor]) -> str:
    """The implementation ``impl`` names for ``params``: ``auto`` is ``fused`` on CUDA, ``foreach`` elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"optimizer.impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return "fused" if on_cuda else "foreach"


def adamw(params: Iterable[Any], impl: str = "auto", **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)`` with the kernel ``impl`` names (see the module docstring)."""
    groups = list(params)
    chosen = resolve_impl(impl, _params(groups))
    flags = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "plain": {"foreach": False, "fused": False},
    }
    return torch.optim.AdamW(groups, **kwargs, **flags[chosen])
