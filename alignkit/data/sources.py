"""Where image-caption pairs come from: one object per kind of source (webdataset shards, a CSV/TSV, generated
shapes), built by :func:`make_source` from the flat ``data.*`` keys.

A source owns everything that depends on its kind, so nothing else asks "which kind is it?":

* validation at construction (a missing path or key fails naming the key and the fix, before any model is built);
* ``size()``: samples in one epoch (shards: ``data.num_samples``, else ``sizes.json`` / img2dataset stats);
* ``identity()``: what sample keys are unique within, for cache fingerprints (the teacher embedding store);
* ``read_pairs()``: the pair table of unique images and captions (STRUCTURE's feature extraction);
* ``samples()``: (key, image, every caption) in storage order (filling the teacher cache ahead of training);
* ``epoch_loader()``: the training batches on the resumable epoch plan (:mod:`alignkit.data.epochs`).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from alignkit.data.csvdata import CsvPairs, check_some_image_opens, read_rows, resolve_image
from alignkit.data.epochs import (
    EpochPlan,
    IndexEpochBatches,
    ResumableLoader,
    ShardEpochDataset,
    index_loader_factory,
    wds_loader_factory,
)
from alignkit.data.pair_table import PairTable, Scan, caption_lines, image_ok, sample_image_key
from alignkit.data.samples import (
    IMAGE_KEYS,
    TEXT_KEYS,
    BadSample,
    PairTransform,
    decode_image,
    first_key,
    split_captions,
)
from alignkit.data.synthetic import SyntheticShapes
from alignkit.data.webdataset import (
    check_empty_shards,
    collate_pairs,
    count_samples,
    expand_urls,
    iter_shard_samples,
    shard_sizes,
)

__all__ = ["KINDS", "SOURCE_KEYS", "CsvSource", "PairSource", "SyntheticSource", "WebDatasetSource"]
__all__ += ["make_source", "source_keys"]

Captions = Literal["all", "first"]
RawSample = tuple[str, Image.Image, list[str]]


def _file_identity(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if "://" in str(path) or str(path).startswith("pipe:") or not p.exists():
        return {"path": str(path)}
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class PairSource(ABC):
    """Image-caption pairs of one kind; see the module docstring for what a source owns."""

    kind: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = ("exact",)  # data.mode values this source can be read in
    reads: ClassVar[tuple[str, ...]]  # the flat data.* keys this kind reads = its constructor's arguments

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any]) -> PairSource:
        """This kind built from the flat ``data.*`` keys it reads (the others are ignored)."""
        return cls(**{k: keys[k] for k in cls.reads if k in keys})

    @abstractmethod
    def size(self) -> int:
        """Samples in one epoch."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the sample keys are unique within (files with sizes and mtimes, or generator settings)."""

    @abstractmethod
    def samples(self) -> Iterator[RawSample]:
        """(sample key, RGB image, every caption line) of every sample training can use (decodable image, at least
        one caption), in storage order; keys are the ``key`` the training batches carry."""

    @abstractmethod
    def _scan(self, captions: Captions, limit: int | None, seed: int) -> Scan:
        """Content hash, reference and captions of each usable sample (see :meth:`read_pairs`)."""

    @abstractmethod
    def iter_images(self, refs: Sequence[tuple]) -> Iterator[Image.Image]:
        """The images of ``refs`` (references made by :meth:`_scan`) as RGB PIL images, in order."""

    @abstractmethod
    def epoch_loader(
        self,
        transform: PairTransform,
        plan: EpochPlan,
        *,
        mode: str,
        shuffle_buffer: int,
        seed: int,
        num_workers: int,
        pin_memory: bool,
    ) -> ResumableLoader:
        """Training batches of ``plan`` (same steps on every rank, deterministic given (seed, epoch), resumable)."""

    def read_pairs(self, captions: Captions = "all", limit: int | None = None, seed: int = 0) -> PairTable:
        """The pair table of this source.

        ``captions="all"`` makes one row per caption line (an image with 5 captions gives 5 rows, one encoding);
        ``"first"`` keeps the first caption (STRUCTURE's ``n_dup_samples: 1``). ``limit`` keeps that many samples
        (source items, before caption expansion): the first ones of a stream, a seeded random subset otherwise.
        """
        if captions not in ("all", "first"):
            raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
        return PairTable.build(self._scan(captions, limit, seed), origin=self)


class _MapSource(PairSource):
    """A source with random access: batches are index lists of a map-style dataset under the epoch plan."""

    @abstractmethod
    def dataset(self, transform: PairTransform) -> Dataset:
        """Map-style dataset of transformed pairs (``len`` = :meth:`size`)."""

    def epoch_loader(self, transform, plan, *, mode, shuffle_buffer, seed, num_workers, pin_memory):
        ds = self.dataset(transform)
        batches = IndexEpochBatches(len(ds), plan.batch_size, seed)
        return ResumableLoader(
            index_loader_factory(ds, batches, collate_pairs, num_workers, pin_memory), plan, ds
        )


class WebDatasetSource(PairSource):
    """webdataset shards in img2dataset layout (``<key>.jpg|png`` + ``<key>.txt``), given as ``data.train_shards``
    (brace spec, glob, directory or list); ``num_samples`` overrides the epoch size read next to the shards."""

    kind = "webdataset"
    modes = ("exact", "resampled")
    reads = ("train_shards", "num_samples", "allow_short_shards")

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        num_samples: int | None = None,
        allow_short_shards: bool = False,
    ) -> None:
        if train_shards is None:
            raise ValueError(
                "data.source=webdataset needs data.train_shards, e.g. /data/coco/{00000..00231}.tar"
            )
        self.urls = expand_urls(train_shards)
        # an empty shard beside good ones would make the good ones train again: refused before any model is built
        check_empty_shards(self.urls, shard_sizes(self.urls), allow=bool(allow_short_shards))
        self.num_samples = num_samples
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:  # read once: the shards' side files do not change during a run
            self._size = count_samples(self.urls, self.num_samples)
        return self._size

    def identity(self) -> dict[str, Any]:
        return {"source": self.kind, "shards": [_file_identity(u) for u in self.urls]}

    def samples(self) -> Iterator[RawSample]:
        for url, key, sample in iter_shard_samples(self.urls):
            ik, tk = first_key(sample, IMAGE_KEYS), first_key(sample, TEXT_KEYS)
            if ik is None or tk is None:
                continue  # the training pipeline skips it too
            try:
                image, lines = decode_image(sample[ik], key), split_captions(sample[tk], f"{key} in {url}")
            except BadSample:
                continue
            if lines:
                yield key, image, lines

    def _scan(self, captions, limit, seed):
        scan = Scan(self._name())
        for url, key, sample in iter_shard_samples(self.urls):
            tk = first_key(sample, TEXT_KEYS)
            lines = caption_lines(sample[tk], captions, f"{key} in {url}") if tk else []
            if not lines or not any(k in sample for k in IMAGE_KEYS):
                scan.skipped += 1
                continue
            data = sample[sample_image_key(sample, key)]
            if not image_ok(data, f"{key} in {url}"):
                scan.skipped += 1
                continue
            scan.add(hashlib.sha1(data).hexdigest(), ("wds", url, key), lines)
            if limit is not None and len(scan.refs) >= limit:
                break
        return scan

    def _name(self) -> str:
        urls = self.urls
        return (
            "wds:" + ",".join(Path(u).name for u in urls[:3]) + (f"+{len(urls) - 3}" if len(urls) > 3 else "")
        )

    def iter_images(self, refs):
        wanted: dict[tuple[str, str], int] = {(u, k): i for i, (_, u, k) in enumerate(refs)}
        urls = list(dict.fromkeys(u for _, u, _ in refs))
        expect = 0
        for url, key, sample in iter_shard_samples(urls):
            if wanted.get((url, key)) != expect:
                continue
            yield decode_image(sample[sample_image_key(sample, key)], key)
            expect += 1
            if expect == len(refs):
                return
        if expect != len(refs):
            raise RuntimeError(f"shards changed while reading: found {expect} of {len(refs)} images")

    def epoch_loader(self, transform, plan, *, mode, shuffle_buffer, seed, num_workers, pin_memory):
        ds = ShardEpochDataset(
            self.urls,
            shard_sizes(self.urls),
            transform,
            plan.batch_size,
            collate_pairs,
            mode=mode,  # type: ignore[arg-type]
            shuffle_buffer=shuffle_buffer,
            seed=seed,
        )
        if mode == "exact" and sum(ds.sizes) != self.size():
            raise ValueError(
                f"data.num_samples={self.size()} disagrees with the per-shard counts "
                f"({sum(ds.sizes)}); drop the override or use data.mode=resampled"
            )
        return ResumableLoader(wds_loader_factory(ds, num_workers, pin_memory), plan, ds)


class CsvSource(_MapSource):
    """A CSV / TSV of (``image_col``: image path, relative to the file's folder unless absolute; ``caption_col``)
    rows, one sample per row. Checked at construction: the file exists, has both columns, and one of its first
    rows' images opens."""

    kind = "csv"
    reads = ("train_csv", "image_col", "caption_col")

    def __init__(
        self, train_csv: str | None = None, image_col: str = "image", caption_col: str = "caption"
    ) -> None:
        if train_csv is None:
            raise ValueError("data.source=csv needs data.train_csv=/path/to/pairs.csv")
        if not Path(train_csv).is_file():
            raise FileNotFoundError(f"data.train_csv={train_csv!r} does not exist")
        self.train_csv, self.image_col, self.caption_col = train_csv, image_col, caption_col
        self.path = Path(str(train_csv))
        self._rows: list[tuple[str, str]] | None = None
        check_some_image_opens(self.path, self.rows)  # wrong image paths fail here, before any model is built

    @property
    def rows(self) -> list[tuple[str, str]]:
        if self._rows is None:
            self._rows = read_rows(self.path, self.image_col, self.caption_col)
        return self._rows

    def size(self) -> int:
        return len(self.rows)

    def identity(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "csv": _file_identity(self.train_csv),
            "columns": [self.image_col, self.caption_col],
        }

    def dataset(self, transform):
        return CsvPairs(str(self.path), transform, self.image_col, self.caption_col, rows=self.rows)

    def samples(self) -> Iterator[RawSample]:
        # Keys are row numbers, as CsvPairs gives them to the training batches.
        for i, (image, caption) in enumerate(self.rows):
            p = resolve_image(self.path.parent, image)
            try:
                img, lines = decode_image(p.read_bytes(), str(p)), split_captions(caption, str(i))
            except (OSError, BadSample):
                continue
            if lines:
                yield str(i), img, lines

    def _scan(self, captions, limit, seed):
        scan = Scan(f"csv:{self.path.name}")
        rows = self.rows
        if limit is not None and len(rows) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
            rows = [rows[i] for i in keep]
        digests: dict[Path, str] = {}
        for image, caption in rows:
            p = resolve_image(self.path.parent, image)
            lines = caption_lines(caption, captions)
            if not lines or not p.is_file():
                scan.skipped += 1
                continue
            if p not in digests:
                data = p.read_bytes()
                digests[p] = hashlib.sha1(data).hexdigest() if image_ok(data, str(p)) else ""
            if not digests[p]:
                scan.skipped += 1
                continue
            scan.add(digests[p], ("file", str(p)), lines)
        return scan

    def iter_images(self, refs):
        for _, path in refs:
            yield decode_image(Path(path).read_bytes(), str(path))


class SyntheticSource(_MapSource):
    """``num_samples`` coloured shapes captioned "a <colour> <shape>" (:class:`SyntheticShapes`), no files."""

    kind = "synthetic"
    reads = ("num_samples", "synthetic_image_size", "seed")

    def __init__(self, num_samples: int | None = None, synthetic_image_size: int = 32, seed: int = 0) -> None:
        self.num_samples = num_samples or 512
        if self.num_samples < 1:
            raise ValueError(
                f"data.num_samples must be positive for data.source=synthetic, got {num_samples}"
            )
        self.image_size, self.seed = synthetic_image_size, seed
        self._shapes = SyntheticShapes(None, self.num_samples, synthetic_image_size, seed)  # type: ignore[arg-type]

    def size(self) -> int:
        return self.num_samples

    def identity(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def dataset(self, transform):
        return SyntheticShapes(transform, self.num_samples, self.image_size, self.seed)

    def samples(self) -> Iterator[RawSample]:
        for i in range(self.num_samples):
            img, caption = self._shapes.item(i)
            yield str(i), img, [caption]

    def _scan(self, captions, limit, seed):
        scan = Scan(f"synthetic:{self.num_samples}:{self.image_size}:{self.seed}")
        n = min(self.num_samples, limit) if limit is not None else self.num_samples
        for i in range(n):
            scan.add(f"synthetic:{self.seed}:{self.image_size}:{i}", (i,), [self._shapes.item(i)[1]])
        return scan

    def iter_images(self, refs):
        for (i,) in refs:
            yield self._shapes.item(i)[0]


KINDS: dict[str, type[PairSource]] = {s.kind: s for s in (WebDatasetSource, CsvSource, SyntheticSource)}


# The flat ``data.*`` keys of the data nodes that describe the source; each kind reads its own (``from_keys``).
SOURCE_KEYS = (
    "train_shards",
    "train_csv",
    "image_col",
    "caption_col",
    "num_samples",
    "synthetic_image_size",
    "seed",
    "allow_short_shards",
)


def make_source(kind: str, **keys: Any) -> PairSource:
    """The source of kind ``data.source`` from the flat ``data.*`` keys (:data:`SOURCE_KEYS`; the one place that
    reads the kind). Keys another kind uses are ignored, so one config can switch kinds with ``data.source=``."""
    unknown = sorted(set(keys) - set(SOURCE_KEYS))
    if unknown:
        raise TypeError(
            f"make_source: unknown data keys {unknown}; the source keys are {', '.join(SOURCE_KEYS)}"
        )
    if kind not in KINDS:
        raise ValueError(f"data.source={kind!r} is not one of {', '.join(KINDS)}")
    return KINDS[kind].from_keys(keys)


def source_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SOURCE_KEYS` among a data node's constructor arguments (``locals()``)."""
    return {k: values[k] for k in SOURCE_KEYS if k in values}
