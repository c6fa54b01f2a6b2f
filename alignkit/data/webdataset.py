"""webdataset shards in img2dataset layout (``<key>.jpg|png`` + ``<key>.txt``) as a training source."""

from __future__ import annotations

import glob
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import braceexpand
import torch
import webdataset as wds

from alignkit.data.samples import BadSample, BadSampleCounter, PairTransform

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
                urls += sorted(str(p) for p in Path(item).glob("*.tar"))
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
            f"(brace ranges like {{00000..00009}} are expanded) or build shards with scripts/make_shards.py"
        )
    return urls


def count_samples(urls: list[str], num_samples: int | None = None) -> int:
    """Epoch size: ``num_samples`` if given, else ``sizes.json`` ({shard name: count}) or img2dataset
    ``<shard>_stats.json`` (``successes``) next to the shards."""
    if num_samples:
        return int(num_samples)
    first = Path(urls[0])
    sizes_file = first.parent / "sizes.json"
    if sizes_file.is_file():
        sizes = json.loads(sizes_file.read_text())
        try:
            return sum(int(sizes[Path(u).name]) for u in urls)
        except KeyError as e:
            raise KeyError(
                f"{sizes_file} has no entry for shard {e}; regenerate it or set data.num_samples"
            ) from None
    stats = [Path(u).with_name(Path(u).stem + "_stats.json") for u in urls]
    if all(s.is_file() for s in stats):
        return sum(int(json.loads(s.read_text())["successes"]) for s in stats)
    raise ValueError(
        f"cannot tell how many samples {urls[0]}... hold: no sizes.json or img2dataset *_stats.json next to the "
        f"shards. Set data.num_samples=N (the total number of pairs) or write sizes.json with scripts/make_shards.py"
    )


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Per-shard sample counts from ``sizes.json`` ({shard name: count}) or img2dataset ``<shard>_stats.json``
    (``successes``) next to the shards; None when neither is there (exact mode then refuses to start)."""
    first = Path(urls[0])
    sizes_file = first.parent / "sizes.json"
    if sizes_file.is_file():
        sizes = json.loads(sizes_file.read_text())
        if all(Path(u).name in sizes for u in urls):
            return [int(sizes[Path(u).name]) for u in urls]
    stats = [Path(u).with_name(Path(u).stem + "_stats.json") for u in urls]
    if all(s.is_file() for s in stats):
        return [int(json.loads(s.read_text())["successes"]) for s in stats]
    return None


class _PassesOfSamples:
    """This rank's and worker's shards, read pass after pass, each pass shuffled on its own.

    Shards are split by node, then by worker (webdataset's ``split_by_node`` / ``split_by_worker``). Each pass
    reshuffles the shard order and runs the sample shuffle buffer to empty before the next pass begins, so with
    shards balanced across ranks x workers the first pass yields every sample exactly once. Repeating (``repeat``)
    keeps every rank and worker stepping the same number of times: the loader's ``with_epoch`` ends the epoch, and
    DDP never waits on a rank that ran dry.
    """

    def __init__(
        self, urls: list[str], shuffle_buffer: int, seed: int, repeat: bool, handler: Callable
    ) -> None:
        self.urls, self.shuffle_buffer, self.seed, self.repeat, self.handler = (
            urls,
            shuffle_buffer,
            seed,
            repeat,
            handler,
        )

    def __call__(self) -> Iterator[dict]:
        mine = [d["url"] for d in wds.split_by_worker(wds.split_by_node([{"url": u} for u in self.urls]))]
        if not mine:
            raise ValueError(
                f"this rank/worker got no shard: {len(self.urls)} shard(s) for more ranks x workers; lower "
                f"data.num_workers or split the data into more shards"
            )
        for rep in itertools.count() if self.repeat else range(1):
            order = list(mine)
            if self.shuffle_buffer > 0:
                random.Random(hash((self.seed, rep))).shuffle(order)
            stages = [wds.SimpleShardList(order), wds.tarfile_to_samples(handler=self.handler)]
            if self.shuffle_buffer > 0:
                rng = random.Random(hash((self.seed, rep, "samples")))
                stages.append(
                    wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
                )
            yield from wds.DataPipeline(*stages)


class _SafeMap:
    """Apply the pair transform, counting and skipping :class:`BadSample` s; attach the running skip count."""

    def __init__(self, transform: PairTransform, counter: BadSampleCounter) -> None:
        self.transform, self.counter = transform, counter

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        for sample in src:
            try:
                out = self.transform(sample)
            except BadSample as e:
                self.counter.skip(sample.get("__key__", "?"), str(e), shard=sample.get("__url__"))
                continue
            out["skipped"] = self.counter.count
            out["worker"] = worker
            yield out


def collate_pairs(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "key": [s["key"] for s in samples],
        "skipped": torch.tensor([s["skipped"] for s in samples]),
        "worker": torch.tensor([s["worker"] for s in samples]),
    }


def make_wds_pipeline(
    urls: list[str],
    transform: PairTransform,
    batch_size: int,
    *,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    repeat: bool = True,
) -> wds.DataPipeline:
    """Shards → split by node → split by worker → samples → (shuffle per pass) → pair transform → batches.

    Remainders are dropped inside each worker (``partial=False``) so every batch has the same size on every rank.
    """
    counter = BadSampleCounter()
    passes = _PassesOfSamples(urls, shuffle_buffer, seed, repeat, counter.handler)
    stages = [
        passes,
        _SafeMap(transform, counter),
        wds.batched(batch_size, collation_fn=collate_pairs, partial=False),
    ]
    return wds.DataPipeline(*stages)
