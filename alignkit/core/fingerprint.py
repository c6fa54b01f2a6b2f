"""Content fingerprints: a canonical hash of a key (dicts, lists, arrays) and of a module's or file's weights.

Feature caches, the teacher store and the frozen towers all key what they store on these, so they live in the
bottom layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["cache_key", "canonical", "digest_tensor", "weights_fingerprint"]


def digest_tensor(t: torch.Tensor | np.ndarray) -> dict[str, Any]:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "dtype": str(t.dtype), "shape": list(t.shape)}


def canonical(obj: Any) -> Any:
    """JSON-able, unambiguous form of a key part. Arrays hash their bytes: never ``str()`` (it elides)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, range):
        return {"range": [obj.start, obj.stop, obj.step]}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return {"array": digest_tensor(obj)}
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    raise TypeError(f"cannot use {type(obj).__name__} in a cache key; pass str/int/float/list/dict/array")


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``key_parts``."""
    blob = json.dumps(canonical(key_parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_fingerprint(source: nn.Module | str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a weights file's bytes, or of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    if isinstance(source, nn.Module):
        for name, t in source.state_dict().items():
            h.update(name.encode())
            h.update(json.dumps(digest_tensor(t)).encode())
        return h.hexdigest()
    with open(source, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
