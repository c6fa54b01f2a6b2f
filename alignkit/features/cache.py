"""Content-addressed, memory-mapped cache of per-layer features of frozen encoders.

An entry lives in ``root/<sha256>/`` where the hash is over a canonical JSON of the key parts (encoder identity
with a weights fingerprint, layers, pooling, preprocessing, dataset identity and subset). It holds one ``.npy``
per layer (``numpy.lib.format.open_memmap``, shape (num_items, D_l)), an optional ``index.npy`` mapping rows
(e.g. captions) to unique items (images), ``manifest.json`` (shapes, dtype, byte sizes) and a ``COMPLETE``
marker. Entries are written in a temp directory and renamed into place at the end, so an interrupted run never
leaves something that looks complete; an entry whose files are missing or whose size/shape disagrees with the
manifest is rebuilt, never read.

Several processes asking for the same missing entry at once (every rank of a multi-GPU job starts by preparing
its features) build it once: the builder holds an exclusive ``flock`` on ``root/.lock-<key>``, the others wait
on it and then read the finished entry. A builder that dies releases its lock, and the next waiter builds.
On a shared filesystem this needs working ``flock`` (NFS v4, Lustre mounted with ``-o flock``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

try:
    import fcntl
except ImportError:  # not POSIX: concurrent builds still end in one consistent entry (atomic rename)
    fcntl = None
from tqdm.auto import tqdm

from alignkit.core.fingerprint import cache_key, canonical, weights_fingerprint

log = logging.getLogger(__name__)

__all__ = [
    "CacheError",
    "CachedFeatures",
    "FeatureCache",
    "cache_key",
    "encode_batches",
    "feature_key",
    "unique_with_index",
    "weights_fingerprint",
]

_MARKER = "COMPLETE"
_MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """The cache cannot be used (unwritable root, inconsistent compute output)."""


def feature_key(
    *,
    encoder: str,
    weights: str,
    layers: Sequence[int],
    pooling: str,
    preprocessing: str | Mapping[str, Any],
    dataset: str | Mapping[str, Any],
    subset: Sequence[int] | np.ndarray | range | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The key parts every feature cache entry should carry (``weights`` = :func:`weights_fingerprint`)."""
    return {
        "encoder": encoder,
        "weights": weights,
        "layers": [int(x) for x in layers],
        "pooling": pooling,
        "preprocessing": preprocessing,
        "dataset": dataset,
        "subset": subset,
        **extra,
    }


def unique_with_index(items: Sequence[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    """First-seen unique items and, for each input item, its row among them (e.g. caption → image)."""
    rows: dict[Hashable, int] = {}
    index = np.fromiter((rows.setdefault(it, len(rows)) for it in items), dtype=np.int64, count=len(items))
    return list(rows), index


@torch.no_grad()
def encode_batches(
    tower: Callable[..., Mapping[int, torch.Tensor]] | Any,
    batches: Iterable[Any],
    layers: Sequence[int],
) -> Iterable[dict[int, torch.Tensor]]:
    """Yield ``tower.forward_layers(batch, layers)`` per batch, on the CPU in fp32 (no autograd)."""
    for batch in batches:
        yield {i: f.float().cpu() for i, f in tower.forward_layers(batch, layers).items()}


@dataclass
class CachedFeatures:
    """A validated cache entry: per-layer memory-mapped arrays (num_items, D_l) and an optional row index."""

    path: Path
    key: str
    manifest: dict[str, Any]
    features: dict[int, np.ndarray]
    index: np.ndarray | None

    @property
    def layers(self) -> list[int]:
        return sorted(self.features)

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.features[layer]

    def rows(self, layer: int, rows: Sequence[int] | np.ndarray | slice) -> np.ndarray:
        """Features of rows ``rows``, going through the row → item index when there is one."""
        items = self.index[rows] if self.index is not None else rows
        return np.asarray(self.features[layer][items])

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else int(self.manifest["num_items"])


class FeatureCache:
    """Content-addressed feature store under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, dtype: str = "float32", progress: bool = True) -> None:
        self.root = Path(root)
        self.dtype = np.dtype(dtype)
        self.progress = progress
        self._check_writable()

    def _check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as err:
            raise CacheError(
                f"feature cache directory {self.root} is not writable ({err}); set another root"
            ) from err

    def path_for(self, key_parts: Mapping[str, Any]) -> Path:
        return self.root / cache_key(key_parts)

    def load(self, key_parts: Mapping[str, Any]) -> CachedFeatures | None:
        """The entry for ``key_parts`` if it is complete and consistent, else ``None`` (with a warning if broken)."""
        path = self.path_for(key_parts)
        if not path.exists():
            return None
        try:
            return self._open(path)
        except Exception as err:  # any inconsistency means "rebuild"
            log.warning("feature cache entry %s is unusable (%s); it will be rebuilt", path, err)
            return None

    def _open(self, path: Path) -> CachedFeatures:
        if not (path / _MARKER).is_file():
            raise ValueError("no completion marker")
        manifest = json.loads((path / _MANIFEST).read_text())
        if manifest["key"] != path.name:
            raise ValueError("manifest key does not match the directory")

        def open_checked(name: str, meta: Mapping[str, Any]) -> np.ndarray:
            file = path / name
            if file.stat().st_size != meta["bytes"]:
                raise ValueError(f"{name}: {file.stat().st_size} bytes, manifest says {meta['bytes']}")
            arr = np.load(file, mmap_mode="r")
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise ValueError(f"{name}: {arr.shape}/{arr.dtype} disagrees with the manifest")
            return arr

        feats = {int(lv): open_checked(m["file"], m) for lv, m in manifest["layers"].items()}
        index = open_checked("index.npy", manifest["index"]) if manifest.get("index") else None
        return CachedFeatures(path, path.name, manifest, feats, index)

    def get_or_compute(
        self,
        key_parts: Mapping[str, Any],
        compute_fn: Callable[[], Iterable[Mapping[int, torch.Tensor | np.ndarray]]],
        *,
        num_items: int,
        index: Sequence[int] | np.ndarray | None = None,
        total_batches: int | None = None,
        desc: str = "encoding",
    ) -> CachedFeatures:
        """Return the cached entry, or build it from ``compute_fn()``.

        ``compute_fn`` returns an iterable of batches ``{layer: (b, D_l)}`` covering the ``num_items`` unique
        items in order (encode each image once); ``index`` maps dataset rows to those items.
        """
        hit = self.load(key_parts)
        if hit is not None:
            log.info("feature cache hit: %s", hit.path)
            return hit
        self._check_writable()  # before any encoding
        key = cache_key(key_parts)
        with self._build_lock(key):
            hit = self.load(key_parts)  # built by another process (another rank) while this one waited
            if hit is not None:
                log.info("feature cache entry built by another process: %s", hit.path)
                return hit
            return self._build(key, key_parts, compute_fn, num_items, index, total_batches, desc)

    @contextmanager
    def _build_lock(self, key: str) -> Iterator[None]:
        """Exclusive per-entry lock across processes (no-op where ``fcntl`` does not exist)."""
        if fcntl is None:
            yield
            return
        with open(self.root / f".lock-{key[:32]}", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("feature cache entry %s is being built by another process; waiting for it", key[:16])
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _build(self, key, key_parts, compute_fn, num_items, index, total_batches, desc) -> CachedFeatures:
        tmp = self.root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            manifest = self._write(tmp, key, key_parts, compute_fn, num_items, index, total_batches, desc)
            (tmp / _MARKER).write_text("ok\n")
            final = self.root / key
            if final.exists():  # a broken entry (load() rejected it): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "feature cache written: %s (%d items, layers %s)", final, num_items, sorted(manifest["layers"])
        )
        return self._open(final)

    def _write(
        self,
        tmp: Path,
        key: str,
        key_parts: Mapping[str, Any],
        compute_fn: Callable[[], Iterable[Mapping[int, Any]]],
        num_items: int,
        index: Sequence[int] | np.ndarray | None,
        total_batches: int | None,
        desc: str,
    ) -> dict[str, Any]:
        batches = compute_fn()
        total = (
            total_batches
            if total_batches is not None
            else (len(batches) if hasattr(batches, "__len__") else None)
        )
        arrays: dict[int, np.ndarray] = {}
        pos = 0
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not self.progress):
            if not arrays:
                for lv, f in batch.items():
                    shape = (num_items, int(np.shape(f)[1]))
                    arrays[int(lv)] = open_memmap(tmp / f"layer_{int(lv):03d}.npy", "w+", self.dtype, shape)
            if sorted(int(k) for k in batch) != sorted(arrays):
                raise CacheError(
                    f"batch layers {sorted(batch)} differ from the first batch's {sorted(arrays)}"
                )
            n = None
            for lv, f in batch.items():
                f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
                n = f.shape[0] if n is None else n
                if pos + n > num_items:
                    raise CacheError(f"compute_fn produced more than num_items={num_items} rows")
                arrays[int(lv)][pos : pos + n] = f
            pos += n or 0
        if pos != num_items:
            raise CacheError(f"compute_fn produced {pos} rows, expected num_items={num_items}")
        layers_meta = {}
        for lv, arr in arrays.items():
            arr.flush()
            name = Path(arr.filename).name
            layers_meta[str(lv)] = {"file": name, "shape": list(arr.shape), "dtype": str(arr.dtype)}
        del arrays  # close the memmaps before measuring and renaming
        for meta in layers_meta.values():
            meta["bytes"] = (tmp / meta["file"]).stat().st_size
        index_meta = None
        if index is not None:
            idx = np.asarray(index, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= num_items):
                raise CacheError("index refers to items outside [0, num_items)")
            np.save(tmp / "index.npy", idx)
            index_meta = {
                "shape": list(idx.shape),
                "dtype": str(idx.dtype),
                "bytes": (tmp / "index.npy").stat().st_size,
            }
        manifest = {
            "key": key,
            "key_parts": canonical(key_parts),
            "num_items": num_items,
            "layers": layers_meta,
            "index": index_meta,
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return manifest
