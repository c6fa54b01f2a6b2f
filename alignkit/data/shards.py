"""Writing webdataset shards: :func:`write_tars` (raw sample dicts + ``sizes.json``; every shard writer of the
package and the tests goes through it) and :func:`write_shards` (img2dataset's layout from images and captions).

What img2dataset writes, per shard ``NNNNN.tar``: samples keyed ``NNNNNIIII`` (shard, index in the shard) with
``.jpg`` (re-encoded), ``.txt`` (the caption) and ``.json`` (the sample's source, caption, size and status), plus
``NNNNN_stats.json`` (``count``, ``successes``, ``failed_to_download``, ``failed_to_decode``, ...) and
``NNNNN.parquet`` (one row per input sample, failed ones included, with the ``.json`` fields; needs pyarrow, the
``shards`` extra). ``sizes.json`` ({shard name: count}) is written besides, for readers that look for it
(open_clip_train, alignkit). An image that cannot be read or decoded is counted and named in a rate-limited
warning, never fatal. Every tar is written under a temporary name and renamed when complete, so an interrupted
run leaves no partial ``.tar``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from alignkit.data.samples import to_rgb

__all__ = ["FailureLog", "clear_shards", "image_bytes", "write_shards", "write_tars"]

log = logging.getLogger(__name__)
_IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}


def _encode(
    image: Image.Image | bytes | str | Path, keep_format: bool, quality: int
) -> tuple[bytes, str, dict[str, Any]]:
    """(bytes, extension, json fields) of one image; re-encoded as JPEG unless ``keep_format`` (file inputs)."""
    source = str(image) if isinstance(image, str | Path) else None
    raw = Path(image).read_bytes() if source is not None else image if isinstance(image, bytes) else None
    ext = Path(source).suffix.lower().lstrip(".") if source else "jpg"
    pil = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(raw))
    pil.load()  # decode now: a truncated or corrupt file fails here, as the sample's own failure
    width, height = pil.size
    fields = {
        "url": source,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
    }
    if keep_format and raw is not None and ext in _IMAGE_EXTS:
        return raw, "jpg" if ext == "jpeg" else ext, fields
    buf = io.BytesIO()
    to_rgb(pil).save(buf, format="JPEG", quality=quality)  # transparency on white, as the training decode
    return buf.getvalue(), "jpg", fields


def image_bytes(image: Image.Image | bytes | str | Path) -> tuple[bytes, str]:
    """(bytes, extension) as stored with ``keep_format``: files and bytes as they are, PIL images as JPEG."""
    data, ext, _ = _encode(image, keep_format=True, quality=95)
    return data, ext


@contextlib.contextmanager
def _atomic_tar(path: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on ``path``'s temporary twin, renamed to ``path`` only once closed without error (an
    interrupted run leaves no partial tar a reader would take for a shard; a killed one at most a ``.partial``)."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with wds.TarWriter(str(tmp)) as sink:
            yield sink
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_tars(
    out_dir: str | Path,
    samples: Iterable[dict[str, Any]],
    per_shard: int | Sequence[int] = 1000,
    on_shard: Callable[[Path, int], None] | None = None,
    prefix: str = "",
) -> dict[str, int]:
    """Write raw webdataset samples (dicts with ``__key__``) as ``out_dir/{prefix}NNNNN.tar`` plus ``sizes.json``.

    ``per_shard``: samples per shard, or the size of each shard in turn (uneven shards; a 0 writes an empty tar).
    ``on_shard(path, count)`` runs as each shard is closed. Returns {shard name: count}, as in ``sizes.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listed = not isinstance(per_shard, int)
    caps = iter(per_shard) if listed else itertools.repeat(per_shard)
    end = object()
    it = iter(samples)
    pending = next(it, end)
    sizes: dict[str, int] = {}
    for i, cap in enumerate(caps):
        if pending is end and not listed:
            break
        path, n = out / f"{prefix}{i:05d}.tar", 0
        with _atomic_tar(path) as sink:
            while n < cap and pending is not end:
                sink.write(pending)
                n, pending = n + 1, next(it, end)
        sizes[path.name] = n
        if on_shard is not None:
            on_shard(path, n)
    if pending is not end:
        raise ValueError(f"more samples than the shard sizes {list(per_shard)} hold")  # type: ignore[arg-type]
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


def clear_shards(out_dir: str | Path) -> int:
    """Remove shards and their side files (``*.tar``, ``*_stats.json``, ``*.parquet``, ``sizes.json``, leftover
    ``*.tar.partial``) from ``out_dir``."""
    out = Path(out_dir)
    old = [*out.glob("*.tar"), *out.glob("*_stats.json"), *out.glob("*.parquet"), *out.glob("*.tar.partial")]
    old += [*out.glob("sizes.json")]
    for p in old:
        p.unlink()
    return len(old)


class FailureLog:
    """Counts bad inputs by status and names them at a limited rate: the first ``first`` one by one, then at most
    one line every ``every_s`` seconds (with how many were not named since), so a folder of broken files cannot
    flood the console."""

    def __init__(self, first: int = 5, every_s: float = 10.0) -> None:
        self.first = first
        self.every_s = every_s
        self.counts: dict[str, int] = {}
        self.first_source: str | None = None
        self._unnamed, self._last = 0, float("-inf")

    def add(self, status: str, source: str, error: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        self.first_source = self.first_source or source
        now = time.monotonic()
        if sum(self.counts.values()) <= self.first or now - self._last >= self.every_s:
            more = f" ({self._unnamed} more not named since the last warning)" if self._unnamed else ""
            log.warning("%s: %s: %s%s", status, source, error, more)
            self._unnamed = 0
            self._last = now
        else:
            self._unnamed += 1


def _read_image(image: Image.Image | bytes | str | Path) -> tuple[str, str] | None:
    """None when ``image`` can be read; else (img2dataset status, error message)."""
    if isinstance(image, str | Path):
        try:
            Path(image).read_bytes()
        except OSError as err:  # missing, unreadable, a folder: img2dataset's "failed_to_download"
            return "failed_to_download", f"{type(err).__name__}: {err.strerror or err}"
    return None


_PARQUET_FIELDS = ("key", "caption", "status", "error_message", "url", "width", "height", "original_width",
                   "original_height")  # fmt: skip


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> bool:
    """The shard's per-sample rows as ``NNNNN.parquet`` (img2dataset's table); False when pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    text, num = pa.string(), pa.int64()
    schema = pa.schema([(f, text if i < 5 else num) for i, f in enumerate(_PARQUET_FIELDS)])
    table = pa.Table.from_pylist([{f: r.get(f) for f in _PARQUET_FIELDS} for r in rows], schema=schema)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)
    return True


def write_shards(
    samples: Iterable[tuple[Image.Image | bytes | str | Path, str | list[str]]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "",
    keep_format: bool = False,
    quality: int = 95,
    overwrite: bool = False,
    total: int | None = None,
    failures: FailureLog | None = None,
) -> list[Path]:
    """Write (image, caption or list of captions) pairs as ``out_dir/{prefix}NNNNN.tar`` in img2dataset's layout.

    Several captions for one image are stored one per line in ``.txt``; the training pipeline picks one at random
    per epoch (CLIP-Refine's protocol for COCO). Images are re-encoded as JPEG (``quality``) like img2dataset does;
    ``keep_format`` keeps image files' own bytes and format. A folder that already holds shards is refused unless
    ``overwrite``, which removes them first (a rewrite never mixes with stale shards or their counts).

    Input ``k`` goes to shard ``k // samples_per_shard`` with key ``SSSSSIIII`` (img2dataset); an image that cannot
    be read (``failed_to_download``) or decoded (``failed_to_decode``) keeps its key and row in the ``.parquet``
    but no sample in the tar, and is counted in the shard's stats and in ``failures`` (named at a limited rate).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / "sizes.json").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds shards; pass overwrite=True (--overwrite) to replace them"
            )
        log.info("removed %d old shard file(s) from %s", clear_shards(out), out)
    failures = failures if failures is not None else FailureLog()
    width = max(4, len(str(samples_per_shard - 1)))  # img2dataset: shard digits + in-shard index digits
    it = iter(tqdm(samples, total=total, desc=f"shards -> {out.name}", unit="img", leave=False))
    first = next(it, None)
    if first is None:
        raise ValueError("write_shards got no samples")
    pairs = itertools.chain([first], it)
    sizes: dict[str, int] = {}
    parquet_ok = True
    for shard in itertools.count():
        chunk = list(itertools.islice(pairs, samples_per_shard))
        if not chunk:
            break
        started = time.time()
        path = out / f"{prefix}{shard:05d}.tar"
        rows: list[dict[str, Any]] = []
        status: dict[str, int] = {}
        with _atomic_tar(path) as sink:
            for i, (image, caption) in enumerate(chunk):
                key = f"{shard:05d}{i:0{width}d}"
                text = "\n".join(caption) if isinstance(caption, list) else caption
                meta: dict[str, Any] = {
                    "key": key,
                    "caption": text,
                    "status": "success",
                    "error_message": None,
                }
                failed = _read_image(image)
                if failed is None:
                    try:
                        data, ext, fields = _encode(image, keep_format, quality)
                    except (OSError, ValueError, Image.DecompressionBombError) as err:  # PIL's decode errors
                        # PIL names the in-memory buffer, not the file: say what it means instead
                        why = (
                            "not an image format PIL reads"
                            if isinstance(err, UnidentifiedImageError)
                            else err
                        )
                        failed = ("failed_to_decode", f"{type(err).__name__}: {why}")
                if failed is None:
                    meta.update(fields)
                    sink.write({"__key__": key, ext: data, "txt": text, "json": json.dumps(meta).encode()})
                else:
                    url = str(image) if isinstance(image, str | Path) else None
                    meta.update(status=failed[0], error_message=failed[1], url=url)
                    failures.add(failed[0], url or f"sample {key}", failed[1])
                status[meta["status"]] = status.get(meta["status"], 0) + 1
                rows.append(meta)
        n = status.get("success", 0)
        sizes[path.name] = n
        now = time.time()
        stats = {
            "count": len(chunk),
            "successes": n,
            "failed_to_download": status.get("failed_to_download", 0),
            "failed_to_decode": status.get("failed_to_decode", 0),
            "failed_to_resize": 0,
            "start_time": started,
            "end_time": now,
            "duration": now - started,
            "status_dict": status,
        }
        path.with_name(path.stem + "_stats.json").write_text(json.dumps(stats, indent=1))
        parquet_ok = _write_parquet(path.with_suffix(".parquet"), rows) and parquet_ok
    if not parquet_ok:
        log.warning("no .parquet tables written: they need pyarrow (pip install 'alignkit[shards]')")
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return [out / name for name in sizes]
