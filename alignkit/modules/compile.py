"""``module.compile``: ``torch.compile`` the open_clip towers in place.

``nn.Module.compile`` compiles a module's ``__call__`` without wrapping it, so parameter names, checkpoints and
exports keep open_clip's keys (``torch.compile(model)`` would return an ``OptimizedModule`` whose state dict
prefixes every key with ``_orig_mod.``). The towers are the image encoder (``visual``) and the text
``transformer`` — almost all the FLOPs; the token embedding, final norm and projections around them stay eager,
which keeps ``encode_text``'s argmax pooling out of the graph."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

TOWERS = ("visual", "transformer")
_KEYS = ("enabled", "backend", "mode", "fullgraph", "dynamic")


def compile_options(spec: Mapping[str, Any] | bool | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from ``module.compile`` (``None``: compilation off)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    unknown = sorted(set(spec) - set(_KEYS))
    if unknown:
        raise ValueError(f"module.compile: unknown option(s) {unknown}; known: {', '.join(_KEYS)}")
    if not spec.get("enabled", False):
        return None
    return {k: v for k, v in spec.items() if k != "enabled" and v is not None}


def compile_towers(model: nn.Module, options: Mapping[str, Any]) -> list[str]:
    """Compile ``model``'s towers in place (``nn.Module.compile``); returns the compiled submodules' names."""
    done = []
    for name in TOWERS:
        tower = getattr(model, name, None)
        if isinstance(tower, nn.Module):
            tower.compile(**options)
            done.append(name)
    if not done:
        raise ValueError(f"module.compile: {type(model).__name__} has none of the towers {TOWERS}")
    return done
