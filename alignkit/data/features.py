"""The data node of the frozen-encoder workflow on cached features: extraction → layer selection → resumable
in-memory feature batches.

``prepare_features(encoder, run_dir)`` (called by the training entry before the module is built) reads the pair
table, encodes every unique image and caption once (:class:`~alignkit.features.extract.FeatureExtractor`, through
the content-addressed feature cache), picks the layer pair (:func:`~alignkit.features.layer_choice.choose_layers`:
mutual kNN on ``n_samples`` pairs, or the last / fixed layers; ``selection.json`` in the run directory) and keeps the
selected layers' features in memory. Training batches are index gathers
(:class:`~alignkit.data.feature_batches.FeatureEpochBatches`) under the same resumable epoch plan as the image-text
loader, so a run killed mid-epoch resumes on exactly the batches it had not trained on.

Data too large to cache: ``data=features_online`` (:mod:`alignkit.data.features_online`) runs the towers in the
training step instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from alignkit.data.batch_plan import loader_steps
from alignkit.data.epochs import EpochPlan, ResumableLoader
from alignkit.data.feature_batches import FeatureEpochBatches
from alignkit.data.pair_table import PairTable
from alignkit.data.sources import PairSource, make_source, source_keys
from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.features.extract import FeatureExtractor
from alignkit.features.layer_choice import SelectionOptions, choose_layers, write_selection_record

log = logging.getLogger(__name__)

__all__ = ["FeaturePairDataModule"]


class FeaturePairDataModule(L.LightningDataModule):
    """Pairs for aligning frozen encoders, as cached features (see the module docstring).

    Args:
        source / train_shards / train_csv / image_col / caption_col / num_samples / synthetic_image_size /
            allow_short_shards: the pair source (:func:`~alignkit.data.sources.make_source`, ``.pair_source``), as in
            :class:`~alignkit.data.ImageTextDataModule`.
        captions: ``all`` (one row per caption; each image still encoded once) or ``first``.
        max_pairs: keep this many source samples (seeded subset; STRUCTURE's subsampling runs).
        cache_dir: feature cache root; must be writable (checked here, before anything is encoded).
        selection: :class:`~alignkit.features.layer_choice.SelectionOptions` (mode, metric, k, n_samples, dedup,
            bootstrap, seed). image_layer / text_layer: the layers for ``mode=fixed`` (negative counts from the end).
        batch_size: per device. encode_batch_size: batch size of the feature extraction.
        epoch_rounding: steps per epoch = floor (drop the remainder) or ceil (top the last global batch up from the
            start of the epoch's order) of pairs / global batch.
        prepare: optional callable run first (e.g. build the offline demo pairs on first use).
        features: ``cached`` only; the online path is its own data config (``data=features_online``).
    """

    def __init__(
        self,
        source: Literal["webdataset", "csv", "synthetic"] = "webdataset",
        train_shards: str | list[str] | None = None,
        train_csv: str | None = None,
        image_col: str = "image",
        caption_col: str = "caption",
        num_samples: int | None = None,
        allow_short_shards: bool = False,
        synthetic_image_size: int = 32,
        captions: Literal["all", "first"] = "all",
        max_pairs: int | None = None,
        cache_dir: str = ".cache/alignkit/features",
        selection: Mapping[str, Any] | None = None,
        image_layer: int | None = None,
        text_layer: int | None = None,
        batch_size: int = 256,
        encode_batch_size: int = 64,
        epoch_rounding: Literal["floor", "ceil"] = "floor",
        prepare: Callable[[], Any] | None = None,
        seed: int = 0,
        features: Literal["cached"] = "cached",
    ) -> None:
        super().__init__()
        if prepare is not None:
            prepare()
        if features != "cached":
            raise ValueError(
                f"data.features={features!r}: the cached-feature node only caches. For the frozen towers in the "
                "training step (data too large to cache) use the online data config: data=features_online "
                "(configs/data/features_online.yaml, same fields) instead of data.features=online"
            )
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if epoch_rounding not in ("floor", "ceil"):
            raise ValueError(f"data.epoch_rounding={epoch_rounding!r} is not one of floor, ceil")
        self.options = SelectionOptions.from_config(selection, image_layer, text_layer)
        # the pair source checks its paths now, before any model is built
        self.pair_source: PairSource = make_source(source, **source_keys(locals()))
        self.captions = captions
        self.max_pairs = max_pairs
        self.image_layer = image_layer
        self.text_layer = text_layer
        self.batch_size = batch_size
        self.epoch_rounding = epoch_rounding
        self.seed = seed
        # fails now (naming data.cache_dir) if the cache cannot be written: before anything is encoded
        self.extractor = FeatureExtractor(cache_dir, encode_batch_size)
        self.table: PairTable | None = None
        self.feats: dict[str, Tensor] = {}
        self.info: dict[str, int] = {}
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict[str, int] | None = None

    def prepare_features(self, encoder: FrozenTowers, output_dir: str | Path | None = None) -> dict[str, int]:
        """Extract (or load) features, select the layer pair; returns what the module needs
        (``image_layer``, ``text_layer``, ``image_dim``, ``text_dim``)."""
        table = self.pair_source.read_pairs(self.captions, limit=self.max_pairs, seed=self.seed)
        choice = choose_layers(
            encoder, table, self.extractor, self.options, self.image_layer, self.text_layer, output_dir
        )
        self.table = table
        self.feats = {
            "image": torch.from_numpy(np.array(choice.image[choice.image_layer])),
            "text": torch.from_numpy(np.array(choice.text[choice.text_layer])),
            "row_image": torch.from_numpy(table.row_image),
            "row_text": torch.from_numpy(table.row_text),
        }
        self.info = write_selection_record(
            choice.info(), self.options, "cached", choice.sample, table, output_dir
        )
        return dict(self.info)

    def paired_features(self) -> tuple[Tensor, Tensor]:
        """(image, text) features of the selected layers, one row per training pair."""
        if not self.feats:
            raise RuntimeError("paired_features() needs prepare_features(encoder) first")
        f = self.feats
        return f["image"][f["row_image"]], f["text"][f["row_text"]]

    # ----- what the training entry and Lightning ask -----
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def dataset_size(self) -> int:
        if not self.feats:
            raise RuntimeError("call prepare_features(encoder) before asking for the dataset size")
        return len(self.feats["row_image"])

    def steps_per_epoch(self, world_size: int | None = None) -> int:
        """Optimizer-free count of batches per rank per epoch for the global batch per_device × world."""
        world = world_size or self._world()[1]
        return loader_steps(self.dataset_size(), self.batch_size, world, self.epoch_rounding)

    def train_dataloader(self) -> ResumableLoader:
        rank, world = self._world()
        steps = self.steps_per_epoch(world)  # (fails clearly before prepare_features)
        f = self.feats
        batches = FeatureEpochBatches(f["image"], f["row_image"], f["text"], f["row_text"], self.seed)
        # one logical worker: batches are in-memory gathers, there is no DataLoader
        plan = EpochPlan(len(batches), self.batch_size, steps, world, rank, workers=1)
        loader = ResumableLoader(batches, plan)
        if (
            self._loader_state is not None
        ):  # a resumed run: skip the batches the checkpoint already trained on
            loader.load_state_dict(self._loader_state)
            self._loader_state = None
        self._train_loader = loader
        return loader

    # The data position travels in the checkpoint through the datamodule hooks (as ImageTextDataModule's), which
    # Lightning restores before it builds the train loader.
    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("train_loader")
