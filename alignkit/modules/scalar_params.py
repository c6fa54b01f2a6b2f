"""Scalar parameters under FSDP.

PyTorch's FSDP (``FullyShardedDataParallel``, the one Lightning's ``FSDPStrategy`` wraps with) flattens every
parameter of a unit into one buffer and refuses 0-dim ones ("FSDP doesn't support scalar parameters. Change
model.logit_scale to a 1D tensor with numel equal to 1."). open_clip's ``logit_scale`` / ``logit_bias`` (and a
loss's learnable scale) are 0-dim. The workaround PyTorch's message names: just before the wrap, view each 0-dim
parameter as shape ``[1]`` (the same storage, so the value, ``requires_grad`` and the optimizer groups built later
are unaffected; ``x * scale`` broadcasts the same). Checkpoints keep open_clip's format: the saved state dict views
those entries back as 0-dim, and a loaded one is viewed as ``[1]`` again."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

import torch
from torch import nn


def promote_scalar_params(module: nn.Module) -> list[str]:
    """View every 0-dim parameter of ``module`` as shape ``[1]`` in place; returns their state-dict keys."""
    names = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.ndim == 0:
            p.data = p.data.reshape(1)
            names.append(name)
        elif getattr(p, "_alignkit_was_scalar", False):
            names.append(name)  # promoted by an earlier call (configure_model runs once per stage)
    for name in names:
        module.get_parameter(name)._alignkit_was_scalar = True
    return names


def demote_in_state_dict(state_dict: MutableMapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """View the ``[1]``-shaped entries ``keys`` of a state dict as 0-dim again (open_clip's format)."""
    for k in keys:
        v = state_dict.get(k)
        if torch.is_tensor(v) and v.shape == (1,):
            state_dict[k] = v.reshape(())


def promote_in_state_dict(state_dict: MutableMapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """View the 0-dim entries ``keys`` of a loaded state dict as ``[1]``, matching the promoted parameters."""
    for k in keys:
        v = state_dict.get(k)
        if torch.is_tensor(v) and v.ndim == 0:
            state_dict[k] = v.reshape(1)
