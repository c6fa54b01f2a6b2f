"""Image-caption pairs as a table for feature extraction: unique images, rows of (image, caption).

Images are identified by a hash of their bytes, so a source that repeats an image once per caption (COCO rows)
still encodes it once; captions are deduplicated the same way. Reading is two passes: a source's ``read_pairs``
(:mod:`alignkit.data.sources`) reads keys, hashes and captions; :meth:`PairTable.iter_images` streams the unique
images again, in order, for encoding.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from alignkit.data.samples import IMAGE_KEYS, BadSample, decode_image, split_captions
from alignkit.features.cache import unique_with_index

log = logging.getLogger(__name__)

__all__ = ["ImageOrigin", "PairTable", "Scan"]


class ImageOrigin(Protocol):
    """Reads a source's images again from the references its scan recorded (every
    :class:`alignkit.data.sources.PairSource` is one; named by shape so this module does not import its user)."""

    def iter_images(self, refs: Sequence[tuple]) -> Iterator[Image.Image]: ...


@dataclass
class Scan:
    """What a source's first pass found: per usable sample a content hash, a reference to find its image again
    and its caption lines; plus the count of skipped samples."""

    name: str
    hashes: list[str] = field(default_factory=list)
    refs: list[tuple] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    skipped: int = 0

    def add(self, digest: str, ref: tuple, lines: list[str]) -> None:
        self.hashes.append(digest)
        self.refs.append(ref)
        self.captions.append(lines)


@dataclass
class PairTable:
    """``rows`` pairs: row r = (unique image ``row_image[r]``, unique caption ``row_text[r]``)."""

    source: str
    image_ids: list[str]  # content hash per unique image
    image_refs: list[tuple]  # how to find each unique image again
    texts: list[str]  # unique captions
    row_image: np.ndarray
    row_text: np.ndarray
    origin: ImageOrigin  # the source that reads the images of ``image_refs`` again

    def __len__(self) -> int:
        return len(self.row_image)

    def identity(self) -> dict:
        """Dataset identity for cache keys: the unique items, in order (arrays are hashed by their bytes)."""
        img = np.frombuffer(hashlib.sha256("\n".join(self.image_ids).encode()).digest(), np.uint8)
        txt = np.frombuffer(hashlib.sha256("\n".join(self.texts).encode()).digest(), np.uint8)
        return {"source": self.source, "images": img, "texts": txt}

    def iter_images(self) -> Iterator[Image.Image]:
        """The unique images as RGB PIL images, in ``image_ids`` order."""
        return self.origin.iter_images(self.image_refs)

    @classmethod
    def build(cls, scan: Scan, origin: ImageOrigin) -> PairTable:
        """Deduplicate a source's scan into unique images (by content hash) and unique captions."""
        if scan.skipped:
            log.warning(
                "%d samples without a decodable image or a (UTF-8) caption were skipped", scan.skipped
            )
        if not scan.refs:
            raise ValueError(f"no usable image-caption pairs in {scan.name}")
        hashes, caps = scan.hashes, scan.captions
        uniq, sample_image = unique_with_index(hashes)
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}
        image_refs = [scan.refs[first[h]] for h in uniq]
        row_image = np.repeat(sample_image, [len(c) for c in caps])
        flat = [c for cs in caps for c in cs]
        texts, row_text = unique_with_index(flat)
        log.info(
            "%s: %d samples -> %d pairs, %d unique images, %d unique captions",
            scan.name, len(scan.refs), len(flat), len(uniq), len(texts),
        )  # fmt: skip
        return cls(scan.name, list(uniq), image_refs, list(texts), row_image, row_text, origin)


def sample_image_key(sample: dict, key: str) -> str:
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise ValueError(f"sample {key!r} has no image (looked for {IMAGE_KEYS})")
    return ext


def image_ok(data: bytes, key: str) -> bool:
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


def caption_lines(raw: bytes | str, mode: str, key: str = "?") -> list[str]:
    """Caption lines; ``[]`` (the sample is skipped and counted) when the bytes are not UTF-8."""
    try:
        lines = split_captions(raw, key)
    except BadSample as e:
        log.warning("%s", e)
        return []
    return lines[:1] if mode == "first" else lines
