"""The data node of the frozen-encoder workflow: feature cache → layer selection → in-memory feature batches.

``prepare_features(encoder, run_dir)`` (called by ``alignkit.run.train`` before the module is built) reads the pair
table, encodes every unique image and caption once through :class:`~alignkit.features.cache.FeatureCache`,
picks the layer pair (mutual kNN on ``n_samples`` pairs, or the last / fixed layers) and keeps the selected
layers' features in memory. Training batches are then index gathers: thousands of steps per second on a CPU.

``features="online"`` is the end-to-end path for data too large to cache: the towers run inside the training
step (frozen, no grad) on images and tokens streamed by :class:`~alignkit.data.ImageTextDataModule`; layer
selection, when asked for, uses cached features of the first ``n_samples`` pairs only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from alignkit.data.pair_table import PairTable, read_pairs
from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.features.cache import CacheError, FeatureCache, encode_batches, feature_key
from alignkit.features.select import DEDUP, select_layers, selection_rows

log = logging.getLogger(__name__)

__all__ = ["FeatureBatches", "FeaturePairDataModule"]

SELECTION_DEFAULTS = {
    "mode": "best",
    "metric": "mutual_knn",
    "k": "rice",
    "n_samples": 5000,
    "dedup": "both",
    "bootstrap": 1000,
    "seed": 0,
}


class FeatureBatches:
    """Shuffled batches of cached features; a re-iterable with a length, split across ranks.

    Every rank draws the same seeded permutation for an epoch and takes its slice of each global batch, so all
    ranks step the same number of times. ``floor`` drops the remainder, ``ceil`` tops the last global batch up
    from the start of the permutation."""

    def __init__(
        self,
        image: Tensor,
        row_image: Tensor,
        text: Tensor,
        row_text: Tensor,
        batch_size: int,
        steps: int,
        seed: int,
        epoch_fn: Callable[[], int],
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.image, self.row_image, self.text, self.row_text = image, row_image, text, row_text
        self.batch_size, self.steps, self.seed, self.epoch_fn = batch_size, steps, seed, epoch_fn
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n, bs = len(self.row_image), self.batch_size
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch_fn())
        perm = torch.randperm(n, generator=g)
        need = self.steps * bs * self.world
        if need > n:
            perm = torch.cat([perm, perm[: need - n]])
        for s in range(self.steps):
            start = (s * self.world + self.rank) * bs
            rows = perm[start : start + bs]
            yield {
                "image_inputs": self.image[self.row_image[rows]],
                "text_inputs": self.text[self.row_text[rows]],
                "row": rows,
            }


class FeaturePairDataModule(L.LightningDataModule):
    """Pairs for aligning frozen encoders (see the module docstring).

    Args:
        source / train_shards / train_csv / image_col / caption_col / num_samples / synthetic_image_size: the
            pair source, as in :class:`~alignkit.data.ImageTextDataModule`.
        captions: ``all`` (one row per caption; each image still encoded once) or ``first``.
        max_pairs: keep this many source samples (seeded subset; STRUCTURE's subsampling runs).
        features: ``cached`` (default) or ``online`` (encoders in the loop).
        cache_dir: feature cache root; must be writable (checked here, before anything is encoded).
        selection: ``mode`` (``best`` = highest-scoring pair, ``last`` = last layers, ``fixed`` = ``image_layer``
            / ``text_layer``), ``metric`` (mutual_knn, linear_cka, unbiased_cka), ``k`` (rice, sqrt, sturges or
            an int), ``n_samples`` (pairs scored), ``dedup`` (``both`` / ``images`` / ``captions`` / ``none``: each
            unique image and/or caption at most once in the scored sample, so repeated captions do not decide the
            kNN), ``bootstrap`` (replicates for the uncertainty of the pick; 0 = off), ``seed``.
        image_layer / text_layer: the layers for ``mode=fixed`` (negative counts from the end).
        batch_size: per device. encode_batch_size: batch size of the feature extraction.
        prepare: optional callable run first (e.g. build the offline demo pairs on first use).
    """

    def __init__(
        self,
        source: Literal["webdataset", "csv", "synthetic"] = "webdataset",
        train_shards: str | list[str] | None = None,
        train_csv: str | None = None,
        image_col: str = "image",
        caption_col: str = "caption",
        num_samples: int | None = None,
        synthetic_image_size: int = 32,
        captions: Literal["all", "first"] = "all",
        max_pairs: int | None = None,
        features: Literal["cached", "online"] = "cached",
        cache_dir: str = ".cache/alignkit/features",
        selection: Mapping[str, Any] | None = None,
        image_layer: int | None = None,
        text_layer: int | None = None,
        batch_size: int = 256,
        encode_batch_size: int = 64,
        epoch_rounding: Literal["floor", "ceil"] = "floor",
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        prepare: Callable[[], Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if prepare is not None:
            prepare()
        if features not in ("cached", "online"):
            raise ValueError(f"data.features={features!r} is not one of cached, online")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.selection = {**SELECTION_DEFAULTS, **dict(selection or {})}
        if self.selection["mode"] not in ("best", "last", "fixed"):
            raise ValueError(
                f"data.selection.mode={self.selection['mode']!r} is not one of best, last, fixed"
            )
        if self.selection["dedup"] not in DEDUP:
            raise ValueError(f"data.selection.dedup={self.selection['dedup']!r} is not one of {list(DEDUP)}")
        if self.selection["mode"] == "fixed" and (image_layer is None or text_layer is None):
            raise ValueError("data.selection.mode=fixed needs data.image_layer and data.text_layer")
        self.source, self.captions, self.max_pairs, self.features = source, captions, max_pairs, features
        self.image_col, self.caption_col, self.train_csv = image_col, caption_col, train_csv
        self.num_samples, self.synthetic_image_size = num_samples, synthetic_image_size
        self.image_layer, self.text_layer = image_layer, text_layer
        self.batch_size, self.encode_batch_size, self.epoch_rounding = (
            batch_size,
            encode_batch_size,
            epoch_rounding,
        )
        self.num_workers, self.shuffle_buffer, self.pin_memory, self.seed = (
            num_workers, shuffle_buffer, pin_memory, seed,
        )  # fmt: skip
        self.urls: list[str] = []
        if source == "webdataset":
            from alignkit.data.webdataset import expand_urls

            if train_shards is None:
                raise ValueError("data.source=webdataset needs data.train_shards (a directory or brace spec)")
            self.urls, self.train_shards = expand_urls(train_shards), train_shards
        elif source == "csv" and (train_csv is None or not Path(train_csv).is_file()):
            raise FileNotFoundError(f"data.train_csv={train_csv!r} does not exist")
        # Fails now (CacheError naming the directory) if the cache cannot be written: before any encoding.
        try:
            self.cache = FeatureCache(cache_dir)
        except CacheError as err:
            raise CacheError(f"{err} (data.cache_dir, default ${{paths.cache_dir}}/features)") from err
        self.table: PairTable | None = None
        self._sample: dict[str, Any] = {}
        self.feats: dict[str, Tensor] = {}
        self.info: dict[str, Any] = {}
        self._online = None

    # ----- feature extraction and layer selection -----
    def _read(self, limit: int | None) -> PairTable:
        return read_pairs(
            self.source, urls=self.urls, csv_path=self.train_csv, image_col=self.image_col,
            caption_col=self.caption_col, num_samples=self.num_samples or 512,
            synthetic_image_size=self.synthetic_image_size, captions=self.captions, limit=limit, seed=self.seed,
        )  # fmt: skip

    def _encode(self, encoder: FrozenTowers, table: PairTable, which: str, layers: list[int]):
        tower = encoder.tower(which)
        ident = encoder.identity(which)
        data = table.identity()

        def key_for(lv: list[int]) -> dict[str, Any]:
            return feature_key(
                encoder=f"{which}:{json.dumps(ident['spec'], sort_keys=True)}",
                weights=ident["weights"],
                layers=lv,
                pooling=getattr(tower, "pool", "masked_mean"),
                preprocessing=ident["preprocessing"],
                dataset={"source": data["source"], which: data["images" if which == "image" else "texts"]},
            )

        key = key_for(layers)
        all_layers = list(range(tower.num_layers))
        if layers != all_layers and (full := self.cache.load(key_for(all_layers))) is not None:
            log.info("feature cache hit (all layers, from a layer-selection run): %s", full.path)
            return full  # an all-layer entry of the same data serves any layer subset
        bs = self.encode_batch_size
        device = next(tower.parameters()).device
        if which == "image":
            n = len(table.image_ids)

            def batches():
                buf = []
                for img in table.iter_images():
                    buf.append(encoder.preprocess_val(img))
                    if len(buf) == bs:
                        yield torch.stack(buf).to(device)
                        buf = []
                if buf:
                    yield torch.stack(buf).to(device)

            run = encode_batches(_Taps(encoder.image_layers), batches(), layers)
        else:
            n = len(table.texts)
            chunks = (table.texts[i : i + bs] for i in range(0, n, bs))
            run = encode_batches(
                _Taps(encoder.text_layers), (encoder.tokenizer(c).to(device) for c in chunks), layers
            )
        return self.cache.get_or_compute(
            key, lambda: run, num_items=n, total_batches=math.ceil(n / bs), desc=f"encoding {which} ({n})"
        )

    def prepare_features(self, encoder: FrozenTowers, output_dir: str | Path | None = None) -> dict[str, Any]:
        """Extract (or load) features, select the layer pair; returns what the module needs
        (``image_layer``, ``text_layer``, ``image_dim``, ``text_dim``)."""
        sel, mode = self.selection, self.selection["mode"]
        vis, txt = encoder.vision, encoder.text
        if mode == "fixed":
            li, lt = vis.resolve_layers([self.image_layer])[0], txt.resolve_layers([self.text_layer])[0]
        else:
            li, lt = vis.num_layers - 1, txt.num_layers - 1
        online = self.features == "online"
        if online:
            self._online = self._online_module(encoder)
            if mode != "best":
                di, dt = encoder.layer_dims(li, lt)
                return self._record(li, lt, di, dt, None, output_dir)
        table = self._read(int(sel["n_samples"]) if online else self.max_pairs)
        layers_i = list(range(vis.num_layers)) if mode == "best" else [li]
        layers_t = list(range(txt.num_layers)) if mode == "best" else [lt]
        img = self._encode(encoder, table, "image", layers_i)
        tx = self._encode(encoder, table, "text", layers_t)
        scores = None
        if mode == "best":
            rows = selection_rows(
                table.row_image, table.row_text, int(sel["n_samples"]), sel["dedup"], int(sel["seed"])
            )
            _check_sample(len(rows), len(table), sel)
            fi = {lv: np.asarray(img[lv][table.row_image[rows]]) for lv in layers_i}
            ft = {lv: np.asarray(tx[lv][table.row_text[rows]]) for lv in layers_t}
            out = output_dir if output_dir is not None and rank_zero_only.rank == 0 else None
            picked = select_layers(
                fi, ft, n_samples=len(rows), metric=sel["metric"], k=sel["k"], mode="best", seed=int(sel["seed"]),
                out_dir=out, names_img=vis.layer_names, names_txt=txt.layer_names, bootstrap=int(sel["bootstrap"]),
            )  # fmt: skip
            li, lt, scores = picked.image_layer, picked.text_layer, picked.scores
            self._sample = {
                "rows": len(rows),
                "unique_images": len(np.unique(table.row_image[rows])),
                "unique_captions": len(np.unique(table.row_text[rows])),
                "score": float(scores.max()),
            }
            if picked.uncertainty is not None:
                self._sample["uncertainty"] = picked.summary()
        self.table = table
        if not online:
            self.feats = {
                "image": torch.from_numpy(np.array(img[li])),
                "text": torch.from_numpy(np.array(tx[lt])),
                "row_image": torch.from_numpy(table.row_image),
                "row_text": torch.from_numpy(table.row_text),
            }
        return self._record(li, lt, img[li].shape[1], tx[lt].shape[1], scores, output_dir)

    def _record(self, li, lt, di, dt, scores, output_dir) -> dict[str, Any]:
        self.info = {
            "image_layer": int(li),
            "text_layer": int(lt),
            "image_dim": int(di),
            "text_dim": int(dt),
        }
        summary = {**self.info, "selection": self.selection, "features": self.features}
        if scores is not None:
            summary.update(self._sample)  # score, the scored sample after dedup, bootstrap uncertainty
        if self.table is not None:
            summary.update(
                pairs=len(self.table), images=len(self.table.image_ids), captions=len(self.table.texts)
            )
        log.info("frozen-encoder data: %s", summary)
        if output_dir is not None:
            _write_json(Path(output_dir) / "selection.json", summary)
        return dict(self.info)

    def paired_features(self) -> tuple[Tensor, Tensor]:
        """(image, text) features of the selected layers, one row per training pair (cached mode)."""
        if not self.feats:
            raise RuntimeError("paired_features() needs features='cached' and prepare_features() first")
        f = self.feats
        return f["image"][f["row_image"]], f["text"][f["row_text"]]

    # ----- online (end-to-end) path -----
    def _online_module(self, encoder: FrozenTowers):
        from alignkit.data import ImageTextDataModule

        dm = ImageTextDataModule(
            source=self.source, train_shards=getattr(self, "train_shards", None), train_csv=self.train_csv,
            image_col=self.image_col, caption_col=self.caption_col, num_samples=self.num_samples,
            batch_size=self.batch_size, num_workers=self.num_workers, shuffle_buffer=self.shuffle_buffer,
            epoch_rounding=self.epoch_rounding, augment=False, random_caption=True,
            synthetic_image_size=self.synthetic_image_size, pin_memory=self.pin_memory, seed=self.seed,
        )  # fmt: skip
        dm.attach(encoder.preprocess_train, encoder.preprocess_val, encoder.tokenizer)
        return dm

    # ----- what train.py and Lightning ask -----
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def dataset_size(self) -> int:
        if self._online is not None:
            return self._online.dataset_size()
        if not self.feats:
            raise RuntimeError("call prepare_features(encoder) before asking for the dataset size")
        return len(self.feats["row_image"])

    def steps_per_epoch(self, world_size: int | None = None) -> int:
        if self._online is not None:
            return self._online.steps_per_epoch(world_size)
        world = world_size or self._world()[1]
        n = self.dataset_size() / (self.batch_size * world)
        steps = math.floor(n) if self.epoch_rounding == "floor" else math.ceil(n)
        if steps < 1:
            raise ValueError(
                f"{self.dataset_size()} pairs cannot fill one global batch of {self.batch_size} x {world}; "
                "lower data.batch_size or add data"
            )
        return steps

    def train_dataloader(self):
        if self._online is not None:
            self._online.trainer = self.trainer
            return self._online.train_dataloader()
        rank, world = self._world()
        f = self.feats
        return FeatureBatches(
            f["image"], f["row_image"], f["text"], f["row_text"], self.batch_size, self.steps_per_epoch(world),
            self.seed, lambda: self.trainer.current_epoch if getattr(self, "trainer", None) else 0, rank, world,
        )  # fmt: skip


def _check_sample(n: int, n_pairs: int, sel: Mapping[str, Any]) -> None:
    """A deduplicated sample can be far smaller than asked (templated captions): say so, fail if too small."""
    from alignkit.features.similarity import resolve_k

    if sel["dedup"] != "none" and n < min(int(sel["n_samples"]), n_pairs):
        log.info("layer selection: %d of %d pairs have an image and a caption not seen before in the sample "
                 "(data.selection.dedup=%s); scoring those %d", n, n_pairs, sel["dedup"], n)  # fmt: skip
    try:
        resolve_k(sel["k"], n)
    except ValueError as err:
        raise ValueError(
            f"layer selection: {err}: the sample has {n} pairs after data.selection.dedup={sel['dedup']}; "
            "use a smaller data.selection.k, a looser dedup (captions, images or none) or more varied pairs"
        ) from err


class _Taps:
    """Adapter: ``encode_batches`` calls ``forward_layers``; route it to the towers' image/text entry points."""

    def __init__(self, fn: Callable[[Tensor, list[int]], dict[int, Tensor]]) -> None:
        self.forward_layers = fn


@rank_zero_only
def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
