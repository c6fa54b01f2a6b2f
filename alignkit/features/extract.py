"""Feature extraction for the frozen-encoder workflow: every unique image and caption of a pair table encoded once
per (tower, weights, layers, preprocessing, data) through the content-addressed :class:`FeatureCache`.

An entry with *all* layers of a tower (written by a layer-selection run) serves any subset of its layers, so a
``last`` / ``fixed`` run after a ``best`` run encodes nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.features.cache import CachedFeatures, CacheError, FeatureCache, encode_batches, feature_key

log = logging.getLogger(__name__)

__all__ = ["FeatureExtractor", "PairItems", "tower_key", "tower_taps"]


class PairItems(Protocol):
    """What feature extraction reads of a set of image-caption pairs: unique images and captions, and per pair
    row the index of each. :class:`alignkit.data.pair_table.PairItems` is one; features sit below data in the
    layer order, so they name the shape, not the class."""

    image_ids: list[str]
    texts: list[str]
    row_image: np.ndarray
    row_text: np.ndarray

    def __len__(self) -> int: ...

    def identity(self) -> dict: ...

    def iter_images(self) -> Iterator[Image.Image]: ...


class FeatureExtractor:
    """Encode (or load) the features of a :class:`PairItems`'s unique images or captions.

    Args:
        cache_dir: feature cache root; must be writable (checked here, before anything is encoded).
        batch_size: batch size of the extraction (``data.encode_batch_size``).
    """

    def __init__(self, cache_dir: str | Path, batch_size: int = 64) -> None:
        if batch_size <= 0:
            raise ValueError(f"data.encode_batch_size must be positive, got {batch_size}")
        try:
            self.cache = FeatureCache(cache_dir)
        except CacheError as err:
            raise CacheError(f"{err} (data.cache_dir, default ${{paths.cache_dir}}/features)") from err
        self.batch_size = batch_size

    def encode(
        self, encoder: FrozenTowers, table: PairItems, which: Literal["image", "text"], layers: list[int]
    ) -> CachedFeatures:
        """Features of ``layers`` for every unique image (``which="image"``) or caption of ``table``, one row
        per unique item (``table.row_image`` / ``row_text`` map pairs to rows)."""
        tower, data = encoder.tower(which), _dataset(table, which)
        all_layers = list(range(tower.num_layers))
        full = self.cache.load(tower_key(encoder, which, all_layers, data)) if layers != all_layers else None
        if full is not None:  # an all-layer entry of the same data serves any subset of its layers
            log.info("feature cache hit (all layers, from a layer-selection run): %s", full.path)
            return full
        bs = self.batch_size
        device = next(tower.parameters()).device
        if which == "image":
            n = len(table.image_ids)
            run = encode_batches(
                tower_taps(encoder, "image"), _image_batches(encoder, table, bs, device), layers
            )
        else:
            n = len(table.texts)
            chunks = (table.texts[i : i + bs] for i in range(0, n, bs))
            run = encode_batches(
                tower_taps(encoder, "text"), (encoder.tokenizer(c).to(device) for c in chunks), layers
            )
        return self.cache.get_or_compute(
            tower_key(encoder, which, layers, data),
            lambda: run,
            num_items=n,
            total_batches=math.ceil(n / bs),
            desc=f"encoding {which} ({n})",
        )


def _image_batches(
    encoder: FrozenTowers, table: PairItems, bs: int, device: torch.device
) -> Iterator[Tensor]:
    """The table's unique images through the towers' eval preprocessing, stacked ``bs`` at a time."""
    buf: list[Tensor] = []
    for img in table.iter_images():
        buf.append(encoder.preprocess_val(img))
        if len(buf) == bs:
            yield torch.stack(buf).to(device)
            buf = []
    if buf:
        yield torch.stack(buf).to(device)


def _dataset(table: PairItems, which: str) -> dict[str, Any]:
    data = table.identity()
    return {"source": data["source"], which: data["images" if which == "image" else "texts"]}


def tower_key(
    encoder: FrozenTowers, which: str, layers: Sequence[int], dataset: Mapping[str, Any]
) -> dict[str, Any]:
    """The cache key of one tower's ``layers`` on ``dataset`` (its source and a digest of its items)."""
    ident = encoder.identity(which)
    return feature_key(
        encoder=f"{which}:{json.dumps(ident['spec'], sort_keys=True)}",
        weights=ident["weights"],
        layers=layers,
        pooling=getattr(encoder.tower(which), "pool", "masked_mean"),
        preprocessing=ident["preprocessing"],
        dataset=dataset,
    )


class _Taps:
    """Adapter: ``encode_batches`` calls ``forward_layers``; route it to the towers' image/text entry points."""

    def __init__(self, fn: Callable[[Tensor, list[int]], dict[int, Tensor]]) -> None:
        self.forward_layers = fn


def tower_taps(encoder: FrozenTowers, which: str) -> _Taps:
    """What :func:`~alignkit.features.cache.encode_batches` runs for one tower."""
    return _Taps(encoder.image_layers if which == "image" else encoder.text_layers)
