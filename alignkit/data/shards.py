"""Writing img2dataset-layout webdataset shards (+ ``sizes.json``) from local images and captions."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image


def _image_bytes(image: Image.Image | bytes | str | Path) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, "jpg"
    if isinstance(image, str | Path):
        p = Path(image)
        ext = p.suffix.lower().lstrip(".")
        return p.read_bytes(), "jpg" if ext == "jpeg" else ext
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


def write_shards(
    samples: Iterable[tuple[Image.Image | bytes | str | Path, str | list[str]]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "",
) -> list[Path]:
    """Write (image, caption or list of captions) pairs to ``out_dir/{prefix}NNNNN.tar`` and ``sizes.json``.

    Several captions for one image are stored one per line in ``.txt``; the training pipeline picks one at random
    per epoch (CLIP-Refine's protocol for COCO).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    paths: list[Path] = []
    writer, shard_idx, n_in_shard = None, 0, 0
    for i, (image, caption) in enumerate(samples):
        if writer is None or n_in_shard == samples_per_shard:
            if writer is not None:
                writer.close()
                sizes[paths[-1].name] = n_in_shard
            paths.append(out / f"{prefix}{shard_idx:05d}.tar")
            writer, shard_idx, n_in_shard = wds.TarWriter(str(paths[-1])), shard_idx + 1, 0
        data, ext = _image_bytes(image)
        text = "\n".join(caption) if isinstance(caption, list) else caption
        writer.write({"__key__": f"{i:09d}", ext: data, "txt": text})
        n_in_shard += 1
    if writer is None:
        raise ValueError("write_shards got no samples")
    writer.close()
    sizes[paths[-1].name] = n_in_shard
    sizes_path = out / "sizes.json"
    old = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    sizes_path.write_text(json.dumps({**old, **sizes}, indent=1))
    return paths
