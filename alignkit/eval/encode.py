"""Encode eval sets with an open_clip-style model (sharded across ranks) and turn embeddings into metrics.

Sharding: rank r of W encodes items r, r+W, r+2W, ... of the images and, independently, of the texts;
:func:`gather_shards` reassembles full matrices in the original order on every rank (no rank waits at a
barrier while rank 0 works). With one process the same code runs without the collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from alignkit.core.distributed import rank as dist_rank
from alignkit.core.distributed import world_size as dist_world
from alignkit.data.evalsets import ClassificationSet, EvalSet
from alignkit.metrics import (
    geometry_metrics,
    retrieval_metrics,
    zeroshot_classifier,
    zeroshot_logits,
    zeroshot_metrics,
)

__all__ = [
    "EncodedEvalSet",
    "EncodedShard",
    "encode_eval_set_shard",
    "evaluate_embeddings",
    "evaluate_sets",
    "gather_shards",
    "merge_shards",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedShard:
    """One rank's slice: rows of ``image``/``text`` sit at ``image_index``/``text_index`` of the full set."""

    name: str
    task: str  # "classification" | "retrieval"
    image: Tensor
    image_index: Tensor
    text: Tensor
    text_index: Tensor
    n_images: int
    n_texts: int
    targets: Tensor  # classification: labels (N_img,); retrieval: text_to_image (N_txt,)
    text_shape: tuple[int, ...]  # (C, T) for classification prompts, (N_txt,) for captions


@dataclass(frozen=True)
class EncodedEvalSet:
    """Raw (not normalised) float32 CPU embeddings of a whole eval set.

    classification: ``image`` (N, d), ``text`` (C, T, d) per class and template, ``targets`` = labels (N,).
    retrieval: ``image`` (N_img, d), ``text`` (N_txt, d), ``targets`` = text_to_image (N_txt,).
    """

    name: str
    task: str
    image: Tensor
    text: Tensor
    targets: Tensor


def _texts_and_targets(evalset: EvalSet) -> tuple[list[str], Tensor, tuple[int, ...]]:
    if isinstance(evalset, ClassificationSet):
        texts = [t.format(c=c) for c in evalset.classnames for t in evalset.templates]
        shape = (len(evalset.classnames), len(evalset.templates))
        return texts, torch.tensor(evalset.labels, dtype=torch.long), shape
    texts, owners = evalset.flat_captions()
    return texts, torch.tensor(owners, dtype=torch.long), (len(texts),)


@torch.no_grad()
def encode_eval_set_shard(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    preprocess: Callable,
    evalset: EvalSet,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> EncodedShard:
    """Encode this rank's strided slice of ``evalset`` with ``model.encode_image`` / ``model.encode_text``.

    The model is put in eval mode for the duration and its previous mode restored. ``rank``/``world_size``
    default to the initialised process group, or (0, 1).
    """
    rank, world = (
        (rank, world_size) if rank is not None and world_size is not None else (dist_rank(), dist_world())
    )
    texts, targets, text_shape = _texts_and_targets(evalset)
    img_idx = torch.arange(len(evalset.images))[rank::world]
    txt_idx = torch.arange(len(texts))[rank::world]
    device = torch.device(device)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    try:
        img_parts, txt_parts = [], []
        # one bar per set on rank 0 (its slice stands for every rank's); leave=False: gone once the set is done
        bar = tqdm(
            total=len(img_idx) + len(txt_idx), desc=f"eval {evalset.name}", unit="item", disable=rank != 0,
            leave=False,
        )  # fmt: skip
        for s in range(0, len(img_idx), batch_size):
            batch = torch.stack([preprocess(evalset.images[int(i)]) for i in img_idx[s : s + batch_size]])
            with amp:
                img_parts.append(model.encode_image(batch.to(device)).float().cpu())
            bar.update(len(batch))
        for s in range(0, len(txt_idx), batch_size):
            tokens = tokenizer([texts[int(i)] for i in txt_idx[s : s + batch_size]])
            with amp:
                txt_parts.append(model.encode_text(tokens.to(device)).float().cpu())
            bar.update(len(tokens))
        bar.close()
    finally:
        model.train(was_training)
    # A rank with an empty slice still needs the embedding width to build (0, d) tensors.
    d = (img_parts or txt_parts or [torch.empty(0, 0)])[0].shape[-1]
    task = "classification" if isinstance(evalset, ClassificationSet) else "retrieval"
    return EncodedShard(
        name=evalset.name,
        task=task,
        image=torch.cat(img_parts) if img_parts else torch.empty(0, d),
        image_index=img_idx,
        text=torch.cat(txt_parts) if txt_parts else torch.empty(0, d),
        text_index=txt_idx,
        n_images=len(evalset.images),
        n_texts=len(texts),
        targets=targets,
        text_shape=text_shape,
    )


def merge_shards(shards: Sequence[EncodedShard]) -> EncodedEvalSet:
    """Reassemble the full set from every rank's shard (order of ``shards`` does not matter)."""
    first = shards[0]
    d = max(s.image.shape[-1] if s.image.numel() else s.text.shape[-1] for s in shards)
    image = torch.empty(first.n_images, d)
    text = torch.empty(first.n_texts, d)
    seen_img = torch.zeros(first.n_images, dtype=torch.bool)
    seen_txt = torch.zeros(first.n_texts, dtype=torch.bool)
    for s in shards:
        if s.image.numel():
            image[s.image_index] = s.image
        if s.text.numel():
            text[s.text_index] = s.text
        seen_img[s.image_index] = True
        seen_txt[s.text_index] = True
    if not (seen_img.all() and seen_txt.all()):
        raise RuntimeError(f"{first.name}: shards do not cover the eval set (wrong rank/world_size?)")
    return EncodedEvalSet(first.name, first.task, image, text.reshape(*first.text_shape, d), first.targets)


def gather_shards(shard: EncodedShard) -> EncodedEvalSet:
    """All-gather every rank's shard (when a process group with >1 rank is up) and merge them.

    ``all_gather_object`` moves CPU tensors by pickling; eval embeddings are small (N × d floats), and
    this avoids padding unequal strided slices. Every rank gets the full result.
    """
    if dist_world() > 1:
        shards: list[EncodedShard | None] = [None] * dist_world()
        dist.all_gather_object(shards, shard)
        return merge_shards([s for s in shards if s is not None])
    return merge_shards([shard])


def evaluate_embeddings(encoded: EncodedEvalSet, name: str | None = None) -> dict[str, float]:
    """Metrics dict with keys ``zs/<set>/...`` (classification) or ``ret/<set>/...`` + ``gap/<set>/...``."""
    name = name or encoded.name
    if encoded.task == "classification":
        logits = zeroshot_logits(encoded.image, zeroshot_classifier(encoded.text))
        return {f"zs/{name}/{k}": v for k, v in zeroshot_metrics(logits, encoded.targets).items()}
    out = {
        f"ret/{name}/{k}": v
        for k, v in retrieval_metrics(encoded.image, encoded.text, encoded.targets).items()
    }
    out.update(
        {
            f"gap/{name}/{k}": v
            for k, v in geometry_metrics(encoded.image, encoded.text, encoded.targets).items()
        }
    )
    return out


def evaluate_sets(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    preprocess: Callable,
    evalsets: Mapping[str, EvalSet],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    keep: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, EncodedEvalSet]]:
    """Encode and score every eval set (keys named after the mapping's keys, sorted).

    Every rank must call this (it gathers) and every rank gets the same result. Also returns the
    embeddings of the sets named in ``keep`` (e.g. for a 2-D projection plot).
    """
    metrics: dict[str, float] = {}
    kept: dict[str, EncodedEvalSet] = {}
    for name, evalset in evalsets.items():
        encoded = gather_shards(
            encode_eval_set_shard(
                model, tokenizer, preprocess, evalset, batch_size, device, autocast_dtype=autocast_dtype
            )
        )
        metrics.update(evaluate_embeddings(encoded, name))
        if name in keep:
            kept[name] = encoded
        rank, world = dist_rank(), dist_world()
        n_img = encoded.image.shape[0]
        log.info(
            "evaluated %s: %d images (rank %d/%d encoded %d of them)",
            name,
            n_img,
            rank,
            world,
            len(range(rank, n_img, world)),
        )
    return dict(sorted(metrics.items())), kept
