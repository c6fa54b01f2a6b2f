"""webdataset shards in img2dataset layout (``<key>.jpg|png`` + ``<key>.txt``) as a training source."""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import braceexpand
import torch
import webdataset as wds

log = logging.getLogger(__name__)


GLOB_CHARS = ("*", "?", "[")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from a brace spec (``/data/{00000..00231}.tar``), a glob (``/data/*.tar``, sorted), a
    ``::``-separated list, a Python list, or a local directory (all ``*.tar`` in it, sorted); local files must
    exist. Braces are expanded first, so ``/data/{coco,cc3m}/*.tar`` works."""
    specs = list(spec) if isinstance(spec, list | tuple) else str(spec).split("::")
    urls: list[str] = []
    for s in specs:
        for item in braceexpand.braceexpand(str(s)):
            if Path(item).is_dir():
                tars = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not tars:
                    raise FileNotFoundError(
                        f"data.train_shards: no *.tar files in {item} (build shards with scripts/make_shards.py)"
                    )
                urls += tars
            elif "://" not in item and not item.startswith("pipe:") and any(c in item for c in GLOB_CHARS):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"data.train_shards: no file matches the pattern {item!r}")
                urls += found
            else:
                urls.append(item)
    if not urls:
        raise ValueError("data.train_shards is empty: give a shard spec like /data/coco/{00000..00231}.tar")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]!r}. Check data.train_shards "
            f"(brace ranges like {{00000..00009}} are expanded) or build shards with `alignkit make-shards`"
        )
    return urls


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Per-shard sample counts: ``sizes.json`` ({shard name: count}) next to the shards, else img2dataset's
    ``<shard>_stats.json`` (``successes``) beside each shard; None when neither covers every shard.

    The one reader of shard sizes: the epoch size (:func:`count_samples`) and the exact-mode plan both use it."""
    sizes_file = Path(urls[0]).parent / "sizes.json"
    if sizes_file.is_file():
        sizes = json.loads(sizes_file.read_text())
        if all(Path(u).name in sizes for u in urls):
            return [int(sizes[Path(u).name]) for u in urls]
    stats = [Path(u).with_name(Path(u).stem + "_stats.json") for u in urls]
    if all(s.is_file() for s in stats):
        return [int(json.loads(s.read_text())["successes"]) for s in stats]
    return None


def count_samples(urls: list[str], num_samples: int | None = None) -> int:
    """Epoch size: ``num_samples`` if given, else the sum of :func:`shard_sizes`."""
    if num_samples:
        return int(num_samples)
    sizes = shard_sizes(urls)
    if sizes is not None:
        return sum(sizes)
    sizes_file = Path(urls[0]).parent / "sizes.json"
    if sizes_file.is_file():
        listed = json.loads(sizes_file.read_text())
        missing = next(Path(u).name for u in urls if Path(u).name not in listed)
        raise KeyError(
            f"{sizes_file} has no entry for shard {missing!r}; regenerate it or set data.num_samples"
        )
    raise ValueError(
        f"cannot tell how many samples {urls[0]}... hold: no sizes.json or img2dataset *_stats.json next to the "
        f"shards. Set data.num_samples=N (the total number of pairs) or write sizes.json with `alignkit make-shards`"
    )


def _is_empty_tar(url: str) -> bool:
    """A local shard with no member: a 0-byte file or a tar that ends at once (reads one header, not the shard)."""
    if "://" in url or url.startswith("pipe:"):
        return False  # remote shards are not opened here; the loader names them if they turn out short
    try:
        with tarfile.open(url, mode="r:") as tar:
            return tar.next() is None
    except tarfile.ReadError:
        return True  # "empty file" (0 bytes) or no tar header at all: it holds no sample


def check_empty_shards(urls: list[str], sizes: list[int] | None, allow: bool = False) -> list[str]:
    """The local shards that hold no sample although the epoch counts samples for them (``sizes.json`` / stats;
    every shard when the counts are unknown). The exact-mode plan fills their positions with spare samples of the
    other shards, so each good sample is trained ``claimed / delivered`` times per epoch. Raises naming them, the
    repetition and the fix, unless ``allow`` (``data.allow_short_shards=true``): then one WARNING says the same."""
    claimed = sizes if sizes is not None else [None] * len(urls)
    empty = [(u, n) for u, n in zip(urls, claimed, strict=True) if n != 0 and _is_empty_tar(u)]
    if not empty:
        return []
    names = [u for u, _ in empty]
    shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    if sizes is not None:
        total, lost = sum(sizes), sum(n for _, n in empty)
        rep = f"{total / (total - lost):.2f}x" if total > lost else "infinite (no shard holds a sample)"
        effect = (
            f"sizes.json counts {lost} of {total} samples in them, so every good sample would train {rep}"
        )
    else:
        effect = "their share of each epoch would be drawn again from the other shards"
    msg = f"{len(names)} empty shard(s): {shown}; {effect} per epoch"
    if not allow or (sizes is not None and total <= lost):
        raise ValueError(
            f"{msg}. Remove or rebuild them (and their sizes.json entries, e.g. with `alignkit make-shards`), or "
            "set data.allow_short_shards=true to train on the rest with that repetition"
        )
    log.warning("%s (data.allow_short_shards=true)", msg)
    return names


def iter_shard_samples(urls: Sequence[str]) -> Iterator[tuple[str, str, dict]]:
    """(url, key, raw sample) of every sample of ``urls``, in storage order (no split, no shuffle)."""
    for url in urls:
        ds = wds.WebDataset(
            url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for sample in ds:
            yield url, sample["__key__"], sample


def collate_pairs(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "key": [s["key"] for s in samples],
        "skipped": torch.tensor([s["skipped"] for s in samples]),
        "worker": torch.tensor([s["worker"] for s in samples]),
    }
