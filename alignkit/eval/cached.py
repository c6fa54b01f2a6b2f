"""Evaluate frozen-tower runs on cached eval-set features (every row and seed of Part A reuses one encoding).

A frozen-encoder model is ``head(tower layer l)``: the towers never change, so the eval images and prompts are
encoded once at every layer (through the same content-addressed :class:`~alignkit.features.cache.FeatureCache`
the training features use) and each trained pair of heads is applied to the cached rows of its layers. The
metrics are :func:`alignkit.eval.encode.evaluate_embeddings` of the result — the same function, names and numbers
as the evaluation callback (``tests/test_repro.py`` checks the two agree).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.data.evalsets import ClassificationSet, EvalSet
from alignkit.encoders.frozen_towers import FrozenTowers, _plain
from alignkit.eval.encode import EncodedEvalSet, _texts_and_targets, evaluate_embeddings
from alignkit.features.cache import CachedFeatures, FeatureCache, encode_batches
from alignkit.features.extract import tower_key, tower_taps

log = logging.getLogger(__name__)

__all__ = ["CachedEvalSet", "encode_cached", "evaluate_export", "shared_towers"]

_TOWERS: dict[str, FrozenTowers] = {}


def shared_towers(**kwargs: Any) -> FrozenTowers:
    """:class:`FrozenTowers` built once per spec in this process (a drop-in ``encoder._target_``): the towers
    are frozen and stay in eval mode, so every Part A run can share one copy instead of reloading the weights."""
    key = json.dumps(
        _plain({k: v for k, v in kwargs.items() if k != "_target_"}), sort_keys=True, default=str
    )
    if key not in _TOWERS:
        _TOWERS[key] = FrozenTowers(**kwargs)
    return _TOWERS[key]


class CachedEvalSet:
    """An eval set's texts/targets and its all-layer tower features (image rows, text rows)."""

    def __init__(self, evalset: EvalSet, image: CachedFeatures, text: CachedFeatures) -> None:
        self.name = evalset.name
        self.task = "classification" if isinstance(evalset, ClassificationSet) else "retrieval"
        _, self.targets, self.text_shape = _texts_and_targets(evalset)
        self.image = image
        self.text = text


def _digest(items: list[bytes]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(hashlib.sha256(it).digest())
    return h.hexdigest()


@torch.no_grad()
def encode_cached(
    towers: FrozenTowers, evalset: EvalSet, cache: FeatureCache, batch_size: int = 128
) -> CachedEvalSet:
    """Features of every image and text of ``evalset`` at every layer of both towers (cached)."""
    towers.eval()
    texts, _, _ = _texts_and_targets(evalset)
    imgs = [evalset.images[i] for i in range(len(evalset.images))]
    img_digest = _digest([im.tobytes() + str(im.size).encode() for im in imgs])
    txt_digest = _digest([t.encode() for t in texts])
    out = {}
    for which, n, digest in (("image", len(imgs), img_digest), ("text", len(texts), txt_digest)):
        layers = list(range(towers.tower(which).num_layers))
        key = tower_key(towers, which, layers, {"source": f"evalset:{evalset.name}", which: digest})
        if which == "image":
            batches = (
                torch.stack([towers.preprocess_val(im) for im in imgs[s : s + batch_size]])
                for s in range(0, n, batch_size)
            )
            run = encode_batches(tower_taps(towers, "image"), batches, layers)
        else:
            chunks = (towers.tokenizer(texts[s : s + batch_size]) for s in range(0, n, batch_size))
            run = encode_batches(tower_taps(towers, "text"), chunks, layers)
        out[which] = cache.get_or_compute(
            key, lambda run=run: run, num_items=n, total_batches=math.ceil(n / batch_size),
            desc=f"eval {evalset.name} {which} ({n})",
        )  # fmt: skip
    return CachedEvalSet(evalset, out["image"], out["text"])


@torch.no_grad()
def evaluate_export(
    model_dir: str | Path, towers: FrozenTowers, sets: Mapping[str, CachedEvalSet]
) -> dict[str, float]:
    """Metrics of a frozen-encoder export directory (``model.json`` + heads) on cached eval sets."""
    from safetensors.torch import load_file

    from alignkit.encoders.aligned import aligned_from_spec

    spec = json.loads((Path(model_dir) / "model.json").read_text())
    heads = load_file(str(Path(model_dir) / "model.safetensors"))
    model, _, _ = aligned_from_spec(spec, heads, towers=towers, source=str(model_dir))
    li, lt = model.image_layer, model.text_layer
    metrics: dict[str, float] = {}
    for name, s in sets.items():
        img = model.image_head(torch.from_numpy(np.asarray(s.image[li]))).float()
        txt = model.text_head(torch.from_numpy(np.asarray(s.text[lt]))).float()
        enc = EncodedEvalSet(name, s.task, img, txt.reshape(*s.text_shape, -1), s.targets)
        metrics.update(evaluate_embeddings(enc, name))
    return metrics
