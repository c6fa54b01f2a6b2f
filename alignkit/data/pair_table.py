"""Image-caption pairs as a table for feature extraction: unique images, rows of (image, caption).

Images are identified by a hash of their bytes, so a source that repeats an image once per caption (COCO rows)
still encodes it once; captions are deduplicated the same way. Reading is two passes: :func:`read_pairs` reads
keys, hashes and captions; :meth:`PairTable.iter_images` streams the unique images again, in order, for encoding.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from alignkit.data.samples import IMAGE_KEYS, TEXT_KEYS, BadSample, decode_image, split_captions
from alignkit.features.cache import unique_with_index

log = logging.getLogger(__name__)

__all__ = ["PairTable", "read_pairs"]


@dataclass
class PairTable:
    """``rows`` pairs: row r = (unique image ``row_image[r]``, unique caption ``row_text[r]``)."""

    source: str
    image_ids: list[str]  # content hash per unique image
    image_refs: list[tuple]  # how to find each unique image again
    texts: list[str]  # unique captions
    row_image: np.ndarray
    row_text: np.ndarray
    synthetic: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.row_image)

    def identity(self) -> dict:
        """Dataset identity for cache keys: the unique items, in order (arrays are hashed by their bytes)."""
        img = np.frombuffer(hashlib.sha256("\n".join(self.image_ids).encode()).digest(), np.uint8)
        txt = np.frombuffer(hashlib.sha256("\n".join(self.texts).encode()).digest(), np.uint8)
        return {"source": self.source, "images": img, "texts": txt}

    def iter_images(self) -> Iterator[Image.Image]:
        """The unique images as RGB PIL images, in ``image_ids`` order."""
        if self.synthetic:
            from alignkit.data.synthetic import SyntheticShapes

            ds = SyntheticShapes(None, **self.synthetic)  # type: ignore[arg-type]
            for (i,) in self.image_refs:
                yield ds.item(i)[0]
            return
        if self.image_refs and self.image_refs[0][0] == "file":
            for _, path in self.image_refs:
                yield decode_image(Path(path).read_bytes(), str(path))
            return
        wanted: dict[tuple[str, str], int] = {(u, k): i for i, (_, u, k) in enumerate(self.image_refs)}
        urls = list(dict.fromkeys(u for _, u, _ in self.image_refs))
        expect = 0
        for url, key, sample in _iter_shards(urls):
            if wanted.get((url, key)) != expect:
                continue
            yield decode_image(sample[_image_key(sample, key)], key)
            expect += 1
            if expect == len(self.image_refs):
                return
        if expect != len(self.image_refs):
            raise RuntimeError(
                f"shards changed while reading: found {expect} of {len(self.image_refs)} images"
            )


def _iter_shards(urls: Sequence[str]) -> Iterator[tuple[str, str, dict]]:
    import webdataset as wds

    for url in urls:
        ds = wds.WebDataset(
            url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for sample in ds:
            yield url, sample["__key__"], sample


def _image_key(sample: dict, key: str) -> str:
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise ValueError(f"sample {key!r} has no image (looked for {IMAGE_KEYS})")
    return ext


def _image_ok(data: bytes, key: str) -> bool:
    """Whether an image can be decoded; a corrupt one is warned about (named) and its sample skipped and counted.

    Decoded in full here, not only ``verify()``-ed: a truncated JPEG passes PIL's verify and would otherwise crash
    the feature extraction after the pair table (and its cache key) was built. Each unique image is decoded
    again once for encoding; that is cheap next to the encoder forward.
    """
    try:
        decode_image(data, key)
    except BadSample as e:
        log.warning("%s", e)
        return False
    return True


def _captions(raw: bytes | str, mode: str, key: str = "?") -> list[str]:
    """Caption lines; ``[]`` (the sample is skipped and counted) when the bytes are not UTF-8."""
    try:
        lines = split_captions(raw, key)
    except BadSample as e:
        log.warning("%s", e)
        return []
    return lines[:1] if mode == "first" else lines


def read_pairs(
    source: Literal["webdataset", "csv", "synthetic"],
    *,
    urls: Sequence[str] = (),
    csv_path: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
    num_samples: int = 512,
    synthetic_image_size: int = 32,
    captions: Literal["all", "first"] = "all",
    limit: int | None = None,
    seed: int = 0,
) -> PairTable:
    """Read the pair table of a training source.

    ``captions="all"`` makes one row per caption line (an image with 5 captions gives 5 rows, one encoding);
    ``"first"`` keeps the first caption (STRUCTURE's ``n_dup_samples: 1``). ``limit`` keeps that many samples
    (source items, before caption expansion): the first ones of a stream, a seeded random subset otherwise.
    """
    if captions not in ("all", "first"):
        raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
    hashes: list[str] = []
    refs: list[tuple] = []
    caps: list[list[str]] = []
    synthetic: dict = {}
    skipped = 0
    if source == "webdataset":
        for url, key, sample in _iter_shards(urls):
            tk = next((k for k in TEXT_KEYS if k in sample), None)
            lines = _captions(sample[tk], captions, f"{key} in {url}") if tk else []
            if not lines or not any(k in sample for k in IMAGE_KEYS):
                skipped += 1
                continue
            data = sample[_image_key(sample, key)]
            if not _image_ok(data, f"{key} in {url}"):
                skipped += 1
                continue
            hashes.append(hashlib.sha1(data).hexdigest())
            refs.append(("wds", url, key))
            caps.append(lines)
            if limit is not None and len(refs) >= limit:
                break
        name = (
            "wds:" + ",".join(Path(u).name for u in urls[:3]) + (f"+{len(urls) - 3}" if len(urls) > 3 else "")
        )
    elif source == "csv":
        path = Path(str(csv_path))
        delim = "\t" if path.suffix in (".tsv", ".tab") else ","
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delim))
        if rows and (image_col not in rows[0] or caption_col not in rows[0]):
            raise KeyError(f"{path} needs columns {image_col!r} and {caption_col!r}; has {list(rows[0])}")
        if limit is not None and len(rows) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
            rows = [rows[i] for i in keep]
        digests: dict[Path, str] = {}
        for r in rows:
            p = Path(r[image_col])
            p = p if p.is_absolute() else path.parent / p
            lines = _captions(r[caption_col] or "", captions)
            if not lines or not p.is_file():
                skipped += 1
                continue
            if p not in digests:
                data = p.read_bytes()
                digests[p] = hashlib.sha1(data).hexdigest() if _image_ok(data, str(p)) else ""
            if not digests[p]:
                skipped += 1
                continue
            hashes.append(digests[p])
            refs.append(("file", str(p)))
            caps.append(lines)
        name = f"csv:{path.name}"
    elif source == "synthetic":
        from alignkit.data.synthetic import SyntheticShapes

        synthetic = {"num_samples": num_samples, "image_size": synthetic_image_size, "seed": seed}
        ds = SyntheticShapes(None, **synthetic)  # type: ignore[arg-type]
        n = min(num_samples, limit) if limit is not None else num_samples
        for i in range(n):
            hashes.append(f"synthetic:{seed}:{synthetic_image_size}:{i}")
            refs.append((i,))
            caps.append([ds.item(i)[1]])
        name = f"synthetic:{num_samples}:{synthetic_image_size}:{seed}"
    else:
        raise ValueError(f"data.source={source!r} is not one of webdataset, csv, synthetic")
    if skipped:
        log.warning("%d samples without a decodable image or a (UTF-8) caption were skipped", skipped)
    if not refs:
        raise ValueError(f"no usable image-caption pairs in {name}")

    uniq, sample_image = unique_with_index(hashes)
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}
    image_refs = [refs[first[h]] for h in uniq]
    row_image = np.repeat(sample_image, [len(c) for c in caps])
    flat = [c for cs in caps for c in cs]
    texts, row_text = unique_with_index(flat)
    log.info(
        "%s: %d samples -> %d pairs, %d unique images, %d unique captions",
        name, len(refs), len(flat), len(uniq), len(texts),
    )  # fmt: skip
    return PairTable(name, list(uniq), image_refs, list(texts), row_image, row_text, synthetic)
