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
    """A sample that cannot be used (corrupt image, missing caption); counted and skipped, never fatal."""


class BadSampleCounter:
    """Counts skipped samples and warns at most once every ``interval_s`` seconds (per process / worker).

    Training goes on; the running count travels with every batch (``skipped``) so the module can log it.
    """

    def __init__(self, interval_s: float = 30.0) -> None:
        self.count = 0
        self.interval_s = interval_s
        self._last_warn = -float("inf")
        self._since_warn = 0

    def skip(self, key: str, reason: str) -> None:
        self.count += 1
        self._since_warn += 1
        now = time.monotonic()
        if now - self._last_warn >= self.interval_s:
            log.warning(
                "skipped bad sample %r (%s); %d skipped since last warning, %d in this worker so far",
                key,
                reason,
                self._since_warn,
                self.count,
            )
            self._last_warn, self._since_warn = now, 0

    def handler(self, exn: Exception) -> bool:
        """webdataset ``handler``: count the broken tar member / shard and continue."""
        self.skip("<tar>", f"{type(exn).__name__}: {exn}")
        return True


def decode_image(data: bytes, key: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise BadSample(f"corrupt image in sample {key!r}: {e}") from e
    if img.mode in ("RGBA", "LA", "P"):
        # Composite transparency onto white rather than black (clip-art and PNG logos).
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def pick_caption(text: str, key: str, rng: random.Random | None) -> str:
    """One caption from a text field holding one or several (one per line); random when ``rng`` is given."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
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
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.random_caption, self.seed = random_caption, seed
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
        text = sample[tk].decode("utf-8") if isinstance(sample[tk], bytes) else str(sample[tk])
        caption = pick_caption(text, key, (rng if self.random_caption else None) or self._caption_rng())
        image = self.preprocess(decode_image(sample[ik], key))
        return {"image": image, "text": self.tokenizer([caption])[0], "key": key}
