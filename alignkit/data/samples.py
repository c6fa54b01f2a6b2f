"""Turning raw samples into (image tensor, token tensor) pairs, and counting the ones that cannot be used."""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("txt", "caption")


class BadSample(ValueError):
    """A sample that cannot be used (corrupt or oversized image, missing field, caption bytes that are not UTF-8);
    counted and skipped, never fatal."""


class BadSampleCounter:
    """Counts skipped samples and warns at most once every ``interval_s`` seconds (per process / worker).

    Training goes on; the running count travels with every batch (``skipped``) so the module can log it.
    """

    def __init__(self, interval_s: float = 30.0) -> None:
        self.count = 0
        self.interval_s = interval_s
        self._last_warn = -float("inf")
        self._since_warn = 0

    def skip(self, key: str, reason: str, shard: str | None = None, n: int = 1) -> None:
        """Count ``n`` unusable samples (``key``: the sample, ``shard``: where it came from, named in the warning)."""
        self.count += n
        self._since_warn += n
        now = time.monotonic()
        if now - self._last_warn >= self.interval_s:
            where = f" in shard {shard}" if shard else ""
            log.warning(
                "skipped bad sample %r%s (%s); %d skipped since last warning, %d in this worker so far",
                key,
                where,
                reason,
                self._since_warn,
                self.count,
            )
            self._last_warn = now
            self._since_warn = 0

    def handler(self, exn: Exception) -> bool:
        """webdataset ``handler``: count the broken tar member / shard and continue."""
        self.skip("<tar>", f"{type(exn).__name__}: {exn}")
        return True


def decode_image(data: bytes, key: str) -> Image.Image:
    """Decode an image; raises :class:`BadSample` for a corrupt one or one over PIL's pixel limit
    (``PIL.Image.MAX_IMAGE_PIXELS``: PIL itself only warns between 1x and 2x the limit, and a decompression bomb
    would use the worker's memory before failing)."""
    try:
        img = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise BadSample(
                f"image of sample {key!r} has {img.width}x{img.height} pixels, over the limit of {limit}"
            )
        img.load()
    except BadSample:
        raise
    except Exception as e:
        raise BadSample(f"corrupt image in sample {key!r}: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; an image with transparency (an alpha band or a transparent palette / colour key) is composited on
    white, not on black (PIL's default): clip art and PNG logos are drawn for a white page."""
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def decode_caption(raw: bytes | str, key: str) -> str:
    """Caption text; bytes that are not UTF-8 make the sample a :class:`BadSample` (skipped and counted).

    Skip rather than decode with replacement characters: a caption with mojibake is a wrong label, and training on
    it silently is worse than one sample fewer."""
    if not isinstance(raw, bytes):
        return str(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample(f"caption of sample {key!r} is not UTF-8 ({e.reason} at byte {e.start})") from e


def split_captions(text: str | bytes, key: str = "?") -> list[str]:
    """The captions of a text field: one per line, stripped, empty lines dropped (bytes: UTF-8, see
    :func:`decode_caption`)."""
    return [ln.strip() for ln in decode_caption(text, key).splitlines() if ln.strip()]


def pick_caption(text: str, key: str, rng: random.Random | None) -> str:
    """One caption from a text field holding one or several (one per line); random when ``rng`` is given."""
    lines = split_captions(text, key)
    if not lines:
        raise BadSample(f"sample {key!r} has an empty caption")
    return rng.choice(lines) if rng is not None and len(lines) > 1 else lines[0]


def first_key(sample: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in sample), None)


class PairTransform:
    """Raw webdataset sample dict → {"image", "text", "key"}; raises :class:`BadSample` for unusable samples."""

    def __init__(
        self, preprocess: Callable, tokenizer: Callable, random_caption: bool = True, seed: int = 0
    ) -> None:
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.random_caption = random_caption
        self.seed = seed
        self._rng: random.Random | None = None

    def _caption_rng(self) -> random.Random | None:
        if not self.random_caption:
            return None
        if self._rng is None:
            info = torch.utils.data.get_worker_info()
            self._rng = random.Random(hash((self.seed, info.id if info else -1)))
        return self._rng

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        """``rng``: the caption RNG for this one sample (the epoch planner passes one seeded by (seed, epoch, key),
        so a resumed run picks the same captions); default: this worker's running RNG."""
        key = sample.get("__key__", "?")
        ik, tk = first_key(sample, IMAGE_KEYS), first_key(sample, TEXT_KEYS)
        if ik is None:
            raise BadSample(f"sample {key!r} has no image (looked for {IMAGE_KEYS})")
        if tk is None:
            raise BadSample(f"sample {key!r} has no caption (looked for {TEXT_KEYS})")
        text = decode_caption(sample[tk], key)
        caption = pick_caption(text, key, (rng if self.random_caption else None) or self._caption_rng())
        image = decode_image(sample[ik], key)
        try:
            pixels = self.preprocess(image)
        except Exception as e:  # e.g. a 0-pixel-wide image the resize cannot handle
            raise BadSample(f"sample {key!r}: preprocessing failed ({type(e).__name__}: {e})") from e
        return {"image": pixels, "text": self.tokenizer([caption])[0], "key": key}
