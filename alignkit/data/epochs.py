"""Deterministic, resumable epochs across ranks and workers.

One epoch is planned from ``(seed, epoch, world, rank, batch size, workers)`` alone, so

* every rank takes the same number of steps ``T`` (``floor``: drop the remainder, each sample at most once and the
  first ``T·B·world`` of the epoch's order exactly once; ``ceil``: wrap around to the start of the epoch's order,
  duplicating ``T·B·world − N`` samples);
* the samples of an epoch are split into contiguous *ranges* of the epoch's order, one per rank and, inside a rank,
  one per DataLoader worker, so no two readers ever see the same sample (``exact`` mode), whatever the shard sizes;
* the k-th batch a rank yields is a pure function of the plan, so a resumed run skips the batches it already
  trained on and continues bit-identically (:class:`ResumableLoader`, whose position Lightning stores in the
  checkpoint through the ``state_dict`` protocol).

Batches of a rank are dealt to its ``K`` workers as contiguous blocks; PyTorch's DataLoader returns the workers'
batches strictly round-robin, so step ``i`` is worker ``i % K``'s ``i // K``-th batch. After a resume at step
``k`` the physical worker ``p`` plays logical worker ``(p + k) % K`` so the round-robin continues where it stopped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from alignkit.data.samples import BadSample, BadSampleCounter, PairTransform

log = logging.getLogger(__name__)
Mode = Literal["exact", "resampled"]


@dataclass(frozen=True)
class EpochPlan:
    """Positions of the epoch's order that one rank reads, and how they are dealt to its workers."""

    num_samples: int  # N, the dataset size
    batch_size: int  # B, per device
    steps: int  # T, batches per rank per epoch (same on every rank)
    world: int
    rank: int
    workers: int  # K >= 1 logical workers (num_workers=0 -> 1)

    def worker_batches(self, w: int) -> tuple[int, int]:
        """(first batch index within the rank, number of batches) of logical worker ``w``."""
        base, extra = divmod(self.steps, self.workers)
        first = w * base + min(w, extra)
        return first, base + (1 if w < extra else 0)

    def worker_positions(self, w: int) -> tuple[int, int]:
        """[start, stop) in the epoch's order (may exceed N: positions are taken modulo N) for logical worker w."""
        first, count = self.worker_batches(w)
        start = (self.rank * self.steps + first) * self.batch_size
        return start, start + count * self.batch_size

    def skipped_batches(self, w: int, consumed: int) -> int:
        """Batches of logical worker ``w`` among the first ``consumed`` batches the rank yielded."""
        q, r = divmod(consumed, self.workers)
        return q + (1 if w < r else 0)

    @staticmethod
    def logical_worker(physical: int, consumed: int, workers: int) -> int:
        return (physical + consumed) % workers


def _seeded(*parts: Any) -> random.Random:
    # A string seed goes through SHA-512 in random.Random: stable across processes (hash() of str is not).
    return random.Random(":".join(str(p) for p in parts))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        _seeded(seed, epoch, "shards").shuffle(order)
    return order


class ShardEpochDataset(IterableDataset):
    """webdataset shards read as planned epochs; each worker yields its collated batches.

    ``exact``: the epoch's order is the shards in a (seed, epoch)-shuffled order, samples in file order; a worker
    opens only the shards its range overlaps (``SimpleShardList`` + ``tarfile_to_samples``: public API), skipping to
    its first sample, and shuffles inside its range with a buffer seeded by (seed, epoch, rank, worker).
    ``resampled``: every worker draws shards *with replacement* from an RNG seeded by (seed, epoch, rank, worker)
    and streams them through the buffer; an epoch is ``T`` batches per rank (sampling with replacement: a sample may
    appear several times or not at all in an epoch).

    A sample the transform rejects (:class:`BadSample`) or that a short shard cannot deliver is counted and replaced
    by a *spare* (see :meth:`__iter__`): the batch count never changes, so no rank waits on another.
    """

    def __init__(
        self,
        urls: list[str],
        sizes: list[int] | None,
        transform: PairTransform,
        batch_size: int,
        collate: Callable[[list[dict]], dict],
        *,
        mode: Mode = "exact",
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        if mode not in ("exact", "resampled"):
            raise ValueError(f"data.mode={mode!r} is not one of exact, resampled")
        if mode == "exact" and sizes is None:
            raise ValueError(
                "data.mode=exact needs per-shard sample counts (sizes.json or img2dataset *_stats.json next to the "
                "shards, e.g. written by alignkit.data.shards.write_shards); or use data.mode=resampled"
            )
        self.urls, self.sizes, self.transform, self.batch_size, self.collate = (
            urls,
            sizes,
            transform,
            batch_size,
            collate,
        )
        self.mode, self.shuffle_buffer, self.seed = mode, shuffle_buffer, seed
        self.counter = BadSampleCounter()
        self.plan: EpochPlan | None = None
        self.epoch, self.consumed = 0, 0
        self._short_shards: set[str] = set()  # shards found shorter than sizes.json (named once per worker)
        self._tar_errors: set[str] = set()

    # ----- raw sample streams -----
    def _read(self, url: str) -> Iterator[dict]:
        return iter(
            wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=self._tar_error))
        )

    def _tar_error(self, exn: Exception) -> bool:
        """webdataset handler for a broken tar (truncated, empty, corrupt member): warn, keep going. The samples
        it loses are counted where the plan notices them missing (:meth:`_exact_range`)."""
        msg = f"{type(exn).__name__}: {exn}"
        if msg not in self._tar_errors:  # once per error and worker: spares may read the same shard again
            self._tar_errors.add(msg)
            log.warning("shard read error (the rest of the shard is lost): %s", msg)
        return True

    def _exact_range(self, start: int, stop: int, count_missing: bool = True) -> Iterator[dict]:
        """Raw samples at positions [start, stop) of the epoch's order (positions past N wrap to the start).

        A shard that ends before ``sizes.json`` says (truncated, empty, unreadable) is named in the log with the
        claimed and the found count, and, when ``count_missing``, each position it could not deliver counts as a
        skipped sample."""
        assert self.sizes is not None
        n = sum(self.sizes)
        order = shard_order(len(self.urls), self.seed, self.epoch, self.shuffle_buffer > 0)
        offsets, pos = [], 0
        for s in order:
            offsets.append(pos)
            pos += self.sizes[s]
        p = start
        while p < stop:
            q = p % n
            i = max(j for j, off in enumerate(offsets) if off <= q and self.sizes[order[j]] > 0)
            url, claimed = self.urls[order[i]], self.sizes[order[i]]
            skip, take = q - offsets[i], min(claimed - (q - offsets[i]), stop - p)
            read = delivered = 0
            for sample in self._read(url):
                read += 1
                if read > skip + take:
                    break
                if read > skip:
                    delivered += 1
                    yield sample
            if delivered < take:
                if url not in self._short_shards:
                    self._short_shards.add(url)
                    log.warning(
                        "shard %s is short: sizes.json claims %d samples, the tar holds %d; its missing samples "
                        "are counted as skipped and replaced by other samples of the epoch",
                        url,
                        claimed,
                        read,
                    )
                if count_missing:
                    self.counter.skip(
                        "<missing>", "shard shorter than sizes.json", shard=url, n=take - delivered
                    )
            p += take

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        empty: set[str] = set()  # shards drawn in a row that yielded nothing
        while True:
            url = rng.choice(self.urls)
            got = False
            for sample in self._read(url):
                got = True
                yield sample
            empty = set() if got else empty | {url}
            if len(empty) == len(self.urls):
                raise RuntimeError(f"every shard is empty or unreadable: {sorted(self.urls)[:5]}")

    def _shuffled(self, src: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 0:
            yield from src
            return
        buf: list[dict] = []
        for sample in src:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)
        yield from buf

    # ----- one worker -----
    def _worker_samples(self, plan: EpochPlan, w: int) -> Iterator[dict]:
        """This worker's raw samples: its planned range (shuffled in a buffer), then in exact mode *spares*, the
        epoch's order from the end of the range on (wrapping once around the epoch) to replace samples that could
        not be used."""
        rng = _seeded(self.seed, self.epoch, plan.rank, w, self.mode)
        if self.mode == "resampled":
            yield from self._shuffled(self._resampled(rng), rng)
            return
        start, stop = plan.worker_positions(w)
        yield from self._shuffled(self._exact_range(start, stop), rng)
        yield from self._exact_range(stop, stop + plan.num_samples, count_missing=False)

    def __iter__(self) -> Iterator[dict]:
        """Exactly the planned number of batches of usable samples (so every rank takes the same number of steps).

        A sample the transform rejects (:class:`BadSample`) and a planned sample a short shard cannot deliver are
        counted as skipped and replaced by the next spare sample (another sample of the epoch, trained twice in
        that epoch), never by copies of one sample. On resume the worker skips ``batches x B`` raw samples without
        decoding them: exact when no sample before the resume point was bad; otherwise up to that many samples
        are trained again after the resume."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("ShardEpochDataset is iterated through ResumableLoader, which sets its plan")
        info = torch.utils.data.get_worker_info()
        physical = info.id if info else 0
        w = EpochPlan.logical_worker(physical, self.consumed, plan.workers)
        _, count = plan.worker_batches(w)
        skip = plan.skipped_batches(w, self.consumed)
        need = (count - skip) * self.batch_size
        if need <= 0:
            return
        raw = self._worker_samples(plan, w)
        for _ in range(skip * self.batch_size):  # raw samples: nothing is decoded while skipping
            next(raw, None)
        batch: list[dict] = []
        bad_shards: set[str] = set()
        for sample in raw:
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            try:
                item = self.transform(sample, rng=_seeded(self.seed, self.epoch, key, "caption"))
            except BadSample as e:
                self.counter.skip(key, str(e), shard=url)
                bad_shards.add(url)
                continue
            batch.append({**item, "skipped": self.counter.count, "worker": physical})
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
                need -= self.batch_size
                if need <= 0:
                    return
        named = sorted(bad_shards | self._short_shards)
        raise RuntimeError(
            f"rank {plan.rank} worker {w}: not enough usable samples for epoch {self.epoch} even after reading "
            f"the whole epoch once more ({self.counter.count} skipped); bad or short shards: {named[:10]}"
            f"{' ...' if len(named) > 10 else ''}. Check them against sizes.json or rebuild them"
        )


class IndexEpochBatches:
    """Batches of indices of a map-style dataset (synthetic, CSV) under the same plan: a (seed, epoch) permutation
    of ``range(N)``, rank ``r`` takes positions ``[r·T·B, (r+1)·T·B)`` (modulo N), in order."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle

    def batches(self, plan: EpochPlan, epoch: int, skip: int) -> list[list[int]]:
        order = list(range(self.num_samples))
        if self.shuffle:
            _seeded(self.seed, epoch, "indices").shuffle(order)
        start = plan.rank * plan.steps * plan.batch_size
        pos = [order[p % self.num_samples] for p in range(start, start + plan.steps * plan.batch_size)]
        out = [pos[i : i + plan.batch_size] for i in range(0, len(pos), plan.batch_size)]
        return out[skip:]


class ResumableLoader:
    """The training iterable: same number of batches on every rank, deterministic given (seed, epoch), and
    resumable mid-epoch.

    It is not a ``DataLoader`` on purpose: Lightning then leaves it alone (no sampler replacement), sizes the epoch
    from ``len()`` (so it does not prefetch: the count of yielded batches is exactly the count trained on) and stores
    :meth:`state_dict` in every checkpoint; on resume :meth:`load_state_dict` makes the next ``iter()`` skip the
    batches the interrupted run already consumed. ``set_epoch`` is called by Lightning through ``.sampler``.
    """

    def __init__(
        self,
        make_loader: Callable[[EpochPlan, int, int], Any],
        plan: EpochPlan,
        dataset: Any = None,
    ) -> None:
        self.make_loader, self.plan, self.dataset = make_loader, plan, dataset
        self.epoch, self.consumed = 0, 0
        self._resume: dict[str, int] | None = None

    @property
    def sampler(self) -> ResumableLoader:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[dict]:
        # A generator: the epoch and the resume point are read at the first ``next()``. Lightning calls ``iter()`` in
        # its data setup, *before* ``set_epoch`` of the resumed epoch.
        epoch = self.epoch
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = min(self._resume["batches"], self.plan.steps)
        self._resume = None
        self.consumed = skip
        if skip:
            log.info("resuming epoch %d of the data at batch %d of %d", epoch, skip, self.plan.steps)
        for batch in self.make_loader(self.plan, epoch, skip):
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        p = self.plan
        # A position loaded but not yet iterated (a resumed run that stops before its first batch, e.g. max_steps
        # already reached) is still the position: saving 0 would replay the epoch from its start.
        pos = self._resume or {"epoch": self.epoch, "batches": self.consumed}
        return {
            **pos,
            "world": p.world,
            "batch_size": p.batch_size,
            "workers": p.workers,
            "num_samples": p.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        p = self.plan
        now = {
            "world": p.world,
            "batch_size": p.batch_size,
            "workers": p.workers,
            "num_samples": p.num_samples,
        }
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume the data position exactly: the data plan changed ({what}). Resume with the same "
                f"devices x nodes, data.batch_size, data.num_workers and data, or start a new run (ckpt_path=null)"
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def wds_loader_factory(
    dataset: ShardEpochDataset, num_workers: int, pin_memory: bool
) -> Callable[[EpochPlan, int, int], Any]:
    def make(plan: EpochPlan, epoch: int, skip: int):
        dataset.plan, dataset.epoch, dataset.consumed = plan, epoch, skip
        return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)

    return make


def index_loader_factory(
    dataset: torch.utils.data.Dataset,
    batches: IndexEpochBatches,
    collate: Callable,
    num_workers: int,
    pin_memory: bool,
) -> Callable[[EpochPlan, int, int], Any]:
    def make(plan: EpochPlan, epoch: int, skip: int):
        return DataLoader(
            dataset,
            batch_sampler=batches.batches(plan, epoch, skip),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )

    return make
