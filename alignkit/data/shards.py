"""Writing img2dataset-layout webdataset shards from local images and captions.

What img2dataset writes, per shard ``NNNNN.tar``: samples keyed ``NNNNNIIII`` (shard, index in the shard) with
``.jpg`` (re-encoded), ``.txt`` (the caption) and ``.json`` (the sample's source, caption, size and status), plus
``NNNNN_stats.json`` (``count``, ``successes``, ...). ``sizes.json`` ({shard name: count}) is written besides, for
readers that look for it (open_clip_train, alignkit). Not written: img2dataset's ``.parquet`` tables.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

__all__ = ["clear_shards", "write_shards"]

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
    pil.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg", fields


def _image_bytes(image: Image.Image | bytes | str | Path) -> tuple[bytes, str]:
    """(bytes, extension) as stored with ``keep_format``: files and bytes as they are, PIL images as JPEG."""
    data, ext, _ = _encode(image, keep_format=True, quality=95)
    return data, ext


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
    sizes: dict[str, int] = {}
    paths: list[Path] = []
    writer, n_in_shard, started = None, 0, time.time()

    def close() -> None:
        writer.close()
        sizes[paths[-1].name] = n_in_shard
        stats = {
            "count": n_in_shard,
            "successes": n_in_shard,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "start_time": started,
            "end_time": time.time(),
            "duration": time.time() - started,
            "status_dict": {"success": n_in_shard},
        }
        paths[-1].with_name(paths[-1].stem + "_stats.json").write_text(json.dumps(stats, indent=1))

    for image, caption in tqdm(samples, total=total, desc=f"shards -> {out.name}", unit="img", leave=False):
        if writer is None or n_in_shard == samples_per_shard:
            if writer is not None:
                close()
            paths.append(out / f"{prefix}{len(paths):05d}.tar")
            writer, n_in_shard, started = wds.TarWriter(str(paths[-1])), 0, time.time()
        data, ext, fields = _encode(image, keep_format, quality)
        text = "\n".join(caption) if isinstance(caption, list) else caption
        key = f"{len(paths) - 1:05d}{n_in_shard:0{width}d}"
        meta = {"key": key, "caption": text, "status": "success", "error_message": None, **fields}
        writer.write({"__key__": key, ext: data, "txt": text, "json": json.dumps(meta).encode()})
        n_in_shard += 1
    if writer is None:
        raise ValueError("write_shards got no samples")
    close()
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return paths
