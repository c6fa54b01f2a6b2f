"""Writing webdataset shards: :func:`write_tars` (raw sample dicts + ``sizes.json``; every shard writer of the
package and the tests goes through it) and :func:`write_shards` (img2dataset's layout from images and captions).

What img2dataset writes, per shard ``NNNNN.tar``: samples keyed ``NNNNNIIII`` (shard, index in the shard) with
``.jpg`` (re-encoded), ``.txt`` (the caption) and ``.json`` (the sample's source, caption, size and status), plus
``NNNNN_stats.json`` (``count``, ``successes``, ...). ``sizes.json`` ({shard name: count}) is written besides, for
readers that look for it (open_clip_train, alignkit). Not written: img2dataset's ``.parquet`` tables.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from alignkit.data.samples import to_rgb

__all__ = ["clear_shards", "image_bytes", "write_shards", "write_tars"]

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
        with wds.TarWriter(str(path)) as sink:
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
    """Remove shards and their side files (``*.tar``, ``*_stats.json``, ``sizes.json``) from ``out_dir``."""
    out = Path(out_dir)
    old = [*out.glob("*.tar"), *out.glob("*_stats.json"), *out.glob("sizes.json")]
    for p in old:
        p.unlink()
    return len(old)


def write_shards(
    samples: Iterable[tuple[Image.Image | bytes | str | Path, str | list[str]]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "",
    keep_format: bool = False,
    quality: int = 95,
    overwrite: bool = False,
    total: int | None = None,
) -> list[Path]:
    """Write (image, caption or list of captions) pairs as ``out_dir/{prefix}NNNNN.tar`` in img2dataset's layout.

    Several captions for one image are stored one per line in ``.txt``; the training pipeline picks one at random
    per epoch (CLIP-Refine's protocol for COCO). Images are re-encoded as JPEG (``quality``) like img2dataset does;
    ``keep_format`` keeps image files' own bytes and format. A folder that already holds shards is refused unless
    ``overwrite``, which removes them first (a rewrite never mixes with stale shards or their counts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / "sizes.json").exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds shards; pass overwrite=True (--overwrite) to replace them"
            )
        log.info("removed %d old shard file(s) from %s", clear_shards(out), out)
    width = max(4, len(str(samples_per_shard - 1)))  # img2dataset: shard digits + in-shard index digits
    it = iter(tqdm(samples, total=total, desc=f"shards -> {out.name}", unit="img", leave=False))
    first = next(it, None)
    if first is None:
        raise ValueError("write_shards got no samples")
    started = time.time()

    def img2dataset_sample(k: int, image: Image.Image | bytes | str | Path, caption: str | list[str]) -> dict:
        data, ext, fields = _encode(image, keep_format, quality)
        text = "\n".join(caption) if isinstance(caption, list) else caption
        key = f"{k // samples_per_shard:05d}{k % samples_per_shard:0{width}d}"
        meta = {"key": key, "caption": text, "status": "success", "error_message": None, **fields}
        return {"__key__": key, ext: data, "txt": text, "json": json.dumps(meta).encode()}

    def stats(path: Path, n: int) -> None:
        nonlocal started
        now = time.time()
        info = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "start_time": started,
            "end_time": now,
            "duration": now - started,
            "status_dict": {"success": n},
        }
        path.with_name(path.stem + "_stats.json").write_text(json.dumps(info, indent=1))
        started = now

    pairs = itertools.chain([first], it)
    samples_out = (img2dataset_sample(k, image, caption) for k, (image, caption) in enumerate(pairs))
    sizes = write_tars(out, samples_out, samples_per_shard, on_shard=stats, prefix=prefix)
    return [out / name for name in sizes]
