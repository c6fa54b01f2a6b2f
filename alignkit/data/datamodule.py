"""The training data node: one LightningDataModule over webdataset shards, a CSV/TSV, or synthetic pairs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import lightning as L

from alignkit.data.batch_plan import loader_steps
from alignkit.data.epochs import EpochPlan, ResumableLoader
from alignkit.data.samples import PairTransform
from alignkit.data.sources import PairSource, make_source, source_keys

log = logging.getLogger(__name__)
Source = Literal["webdataset", "csv", "synthetic"]
MODES = ("exact", "resampled")


class ImageTextDataModule(L.LightningDataModule):
    """Image–caption pairs for training.

    Args:
        source: ``webdataset`` (``train_shards``, img2dataset layout), ``csv`` (``train_csv``) or ``synthetic``.
        batch_size: **per device**. The global batch is per_device × devices × nodes × accumulation; both are logged.
        num_samples: epoch size override (else ``sizes.json`` / img2dataset stats; the CSV's / synthetic length).
        epoch_rounding: steps per epoch = floor (drop the remainder, as the released CLIP-Refine code:
            117,104 / 512 → 228 steps) or ceil (top the last batch up from the next pass) of N / global batch.
        augment: use open_clip's training transform (random resized crop) instead of its eval transform.
            The released CLIP-Refine recipe uses the model's eval preprocessing (no augmentation).
        random_caption: for samples with several captions (one per line), pick one at random each time.
        mode: ``exact`` (default: every sample once per epoch across all ranks and workers, resumable mid-epoch;
            webdataset needs per-shard counts) or ``resampled`` (webdataset only: shards drawn with replacement,
            an epoch is a number of steps). See docs/distributed.md.
        allow_short_shards: train even when a shard beside good ones is empty (one WARNING with the repetition it
            causes); by default such a shard is refused before any model is built.

    The ``source`` / ``train_shards`` / ``train_csv`` / ``image_col`` / ``caption_col`` / ``num_samples`` /
    ``synthetic_image_size`` keys build a :class:`~alignkit.data.sources.PairSource` (``.pair_source``), which
    checks paths at construction, before any model is built.
    """

    def __init__(
        self,
        source: Source = "webdataset",
        train_shards: str | list[str] | None = None,
        train_csv: str | None = None,
        image_col: str = "image",
        caption_col: str = "caption",
        num_samples: int | None = None,
        allow_short_shards: bool = False,
        batch_size: int = 32,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        epoch_rounding: Literal["floor", "ceil"] = "floor",
        augment: bool = False,
        random_caption: bool = True,
        synthetic_image_size: int = 32,
        pin_memory: bool = True,
        seed: int = 0,
        mode: str = "exact",
    ) -> None:
        super().__init__()
        if mode == "legacy":
            raise ValueError(
                "data.mode=legacy was removed (its shard-split reader was not resumable and its shuffle was not "
                "reproducible across processes); use data.mode=exact (each sample once per epoch, resumable) or, "
                "for webdataset shards without per-shard counts, data.mode=resampled"
            )
        if mode not in MODES:
            raise ValueError(f"data.mode={mode!r} is not one of {', '.join(MODES)}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.pair_source: PairSource = make_source(source, **source_keys(locals()))
        if mode not in self.pair_source.modes:
            raise ValueError(
                f"data.mode={mode} is for webdataset shards; data.source={source} uses data.mode="
                f"{' or '.join(self.pair_source.modes)}"
            )
        self.pair_source.size()  # the epoch size is read now: a missing sizes.json fails before any model is built
        # The flat keys stay readable: data nodes built on this one pass them on (e.g. to read a pair table).
        self.train_csv = train_csv
        self.image_col = image_col
        self.caption_col = caption_col
        self.num_samples = num_samples
        self.synthetic_image_size = synthetic_image_size
        self.source = source
        self.mode = mode
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.epoch_rounding = epoch_rounding
        self.augment = augment
        self.random_caption = random_caption
        self.seed = seed
        self.pin_memory = pin_memory
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict | None = None
        self.preprocess_train: Callable | None = None
        self.preprocess_val: Callable | None = None
        self.tokenizer: Callable | None = None

    @property
    def urls(self) -> list[str]:
        """The expanded shard URLs of a shard source; empty for the others."""
        return list(getattr(self.pair_source, "urls", []))

    def attach(self, preprocess_train: Callable, preprocess_val: Callable, tokenizer: Callable) -> None:
        """Give the data node the model's own preprocessing and tokenizer (open_clip's)."""
        self.preprocess_train, self.preprocess_val, self.tokenizer = (
            preprocess_train,
            preprocess_val,
            tokenizer,
        )

    def _transform(self) -> PairTransform:
        if self.tokenizer is None:
            raise RuntimeError(
                "call datamodule.attach(preprocess_train, preprocess_val, tokenizer) before loading"
            )
        pre = self.preprocess_train if self.augment else self.preprocess_val
        return PairTransform(pre, self.tokenizer, random_caption=self.random_caption, seed=self.seed)

    def _world(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def dataset_size(self) -> int:
        return self.pair_source.size()

    def steps_per_epoch(self, world_size: int | None = None) -> int:
        """Optimizer-free count of batches per rank per epoch for the global batch per_device × world."""
        world = world_size or self._world()
        return loader_steps(self.dataset_size(), self.batch_size, world, self.epoch_rounding)

    def _plan(self) -> EpochPlan:
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        return EpochPlan(
            num_samples=self.dataset_size(),
            batch_size=self.batch_size,
            steps=self.steps_per_epoch(world),
            world=world,
            rank=rank,
            workers=max(1, self.num_workers),
        )

    def train_dataloader(self) -> ResumableLoader:
        return self._planned_loader(self._transform())

    # The data position travels in the checkpoint through the datamodule hooks, which Lightning restores before it
    # builds the train loader. (Lightning also stores the loader's own state_dict, but restores it only when the
    # loader is built after the loops are restored; estimated_stepping_batches in configure_optimizers builds it
    # earlier, so that copy is never loaded.)
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loader_state = state_dict.get("train_loader")

    def _planned_loader(self, transform: PairTransform) -> ResumableLoader:
        """Same steps on every rank, deterministic given (seed, epoch), resumable (alignkit.data.epochs)."""
        loader = self._build_planned_loader(transform)
        if self._loader_state is not None:
            loader.load_state_dict(self._loader_state)
            self._loader_state = None
        self._train_loader = loader
        return loader

    def _build_planned_loader(self, transform: PairTransform) -> ResumableLoader:
        return self.pair_source.epoch_loader(
            transform,
            self._plan(),
            mode=self.mode,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
