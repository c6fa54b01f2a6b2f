"""The online data node of the frozen-encoder workflow (``data=features_online``), for data too large to cache:
images and tokens stream through the image-text pipeline (:class:`~alignkit.data.ImageTextDataModule`: exact,
resumable epochs) and the frozen towers run under ``no_grad`` inside the training step.

Layer selection, when asked for (``selection.mode=best``), extracts and scores cached features of the first
``selection.n_samples`` pairs only; ``last`` / ``fixed`` encode nothing before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from alignkit.data.datamodule import ImageTextDataModule
from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.features.extract import FeatureExtractor
from alignkit.features.layer_choice import (
    SelectionOptions,
    choose_layers,
    layer_info,
    preset_layers,
    write_selection_record,
)

__all__ = ["OnlineFeaturePairDataModule"]


class OnlineFeaturePairDataModule(ImageTextDataModule):
    """Image-text pairs for frozen towers in the loop, plus the layer choice the module is built from.

    Args:
        captions: ``all`` or ``first`` caption lines per sample in the scored sample (``mode=best``).
        cache_dir / encode_batch_size: feature cache and batch size of the selection sample's extraction.
        selection / image_layer / text_layer: as in :class:`~alignkit.data.features.FeaturePairDataModule`.
        prepare: optional callable run first (e.g. build the offline demo pairs on first use).
        **pairs: the image-text pipeline's arguments (:class:`~alignkit.data.ImageTextDataModule`: source,
            train_shards, batch_size per device, num_workers, epoch_rounding, ...).
    """

    def __init__(
        self,
        captions: Literal["all", "first"] = "all",
        cache_dir: str = ".cache/alignkit/features",
        selection: Mapping[str, Any] | None = None,
        image_layer: int | None = None,
        text_layer: int | None = None,
        encode_batch_size: int = 64,
        prepare: Callable[[], Any] | None = None,
        **pairs: Any,
    ) -> None:
        if prepare is not None:
            prepare()
        super().__init__(**pairs)
        self.options = SelectionOptions.from_config(selection, image_layer, text_layer)
        self.captions = captions
        self.image_layer = image_layer
        self.text_layer = text_layer
        # fails now (naming data.cache_dir) if the cache cannot be written: before anything is encoded
        self.extractor = FeatureExtractor(cache_dir, encode_batch_size)
        self.info: dict[str, int] = {}

    def prepare_features(self, encoder: FrozenTowers, output_dir: str | Path | None = None) -> dict[str, int]:
        """Select the layer pair (scoring the first ``selection.n_samples`` pairs with ``mode=best``); returns
        what the module needs (``image_layer``, ``text_layer``, ``image_dim``, ``text_dim``)."""
        self.attach(encoder.preprocess_train, encoder.preprocess_val, encoder.tokenizer)
        if self.options.mode != "best":
            li, lt = preset_layers(encoder, self.options, self.image_layer, self.text_layer)
            info, sample, table = layer_info(li, lt, *encoder.layer_dims(li, lt)), None, None
        else:
            table = self.pair_source.read_pairs(
                self.captions, limit=int(self.options.n_samples), seed=self.seed
            )
            choice = choose_layers(encoder, table, self.extractor, self.options, output_dir=output_dir)
            info, sample = choice.info(), choice.sample
        self.info = write_selection_record(info, self.options, "online", sample, table, output_dir)
        return dict(self.info)
