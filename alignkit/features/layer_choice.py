"""The layer-selection step of a frozen-encoder run: its options (``data.selection``), the features it needs, the
pick (:func:`alignkit.features.select.select_layers` on a deduplicated sample) and the record it leaves in the run
directory (``selection.json``; ``layer_scores.csv`` / ``.png`` come from :mod:`alignkit.features.select`).

``select.py`` scores arrays; this module runs that scoring for a data node (pair table and towers in, layer ids and
a record out), so the cached and the online data nodes pick layers the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.features.cache import CachedFeatures
from alignkit.features.extract import FeatureExtractor, PairItems
from alignkit.features.select import DEDUP, select_layers, selection_rows

log = logging.getLogger(__name__)

__all__ = ["LayerChoice", "SelectionOptions", "check_sample", "choose_layers", "write_selection_record"]

MODES = ("best", "last", "fixed")


@dataclass(frozen=True)
class SelectionOptions:
    """``data.selection``: ``mode`` (``best`` = highest-scoring pair, ``last`` = last layers, ``fixed`` = the
    node's ``image_layer`` / ``text_layer``), ``metric`` (mutual_knn, linear_cka, unbiased_cka), ``k`` (rice,
    sqrt, sturges or an int), ``n_samples`` (pairs scored), ``dedup`` (``both`` / ``images`` / ``captions`` /
    ``none``: each unique image and/or caption at most once in the scored sample, so repeated captions do not
    decide the kNN), ``bootstrap`` (replicates for the uncertainty of the pick; 0 = off), ``seed``."""

    mode: str = "best"
    metric: str = "mutual_knn"
    k: str | int = "rice"
    n_samples: int = 5000
    dedup: str = "both"
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.selection.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.dedup not in DEDUP:
            raise ValueError(f"data.selection.dedup={self.dedup!r} is not one of {list(DEDUP)}")

    @classmethod
    def from_config(
        cls,
        selection: Mapping[str, Any] | None,
        image_layer: int | None = None,
        text_layer: int | None = None,
    ) -> SelectionOptions:
        """Validated options; with ``mode=fixed`` the node's ``image_layer`` and ``text_layer`` must be set."""
        given = dict(selection or {})
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"data.selection has unknown keys {unknown}; known: {list(cls.__dataclass_fields__)}"
            )
        opts = cls(**given)
        if opts.mode == "fixed" and (image_layer is None or text_layer is None):
            raise ValueError("data.selection.mode=fixed needs data.image_layer and data.text_layer")
        return opts

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_layers(
    encoder: FrozenTowers, opts: SelectionOptions, image_layer: int | None, text_layer: int | None
) -> tuple[int, int]:
    """(image, text) layer ids before any scoring: the fixed pair (negative ids count from the end) or the last."""
    if opts.mode == "fixed":
        if image_layer is None or text_layer is None:
            raise ValueError("data.selection.mode=fixed needs data.image_layer and data.text_layer")
        return encoder.vision.resolve_layers([image_layer])[0], encoder.text.resolve_layers([text_layer])[0]
    return encoder.vision.num_layers - 1, encoder.text.num_layers - 1


@dataclass
class LayerChoice:
    """The picked layers, the features extracted for the choice (every layer with ``mode=best``, else the picked
    one) and, with ``mode=best``, the scored sample (size, unique items, score, bootstrap summary)."""

    image_layer: int
    text_layer: int
    image: CachedFeatures
    text: CachedFeatures
    sample: dict[str, Any] | None = None

    def info(self) -> dict[str, int]:
        """What the module is built from."""
        return layer_info(
            self.image_layer,
            self.text_layer,
            self.image[self.image_layer].shape[1],
            self.text[self.text_layer].shape[1],
        )


def layer_info(image_layer: int, text_layer: int, image_dim: int, text_dim: int) -> dict[str, int]:
    return {
        "image_layer": int(image_layer),
        "text_layer": int(text_layer),
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
    }


def choose_layers(
    encoder: FrozenTowers,
    table: PairItems,
    extractor: FeatureExtractor,
    opts: SelectionOptions,
    image_layer: int | None = None,
    text_layer: int | None = None,
    output_dir: str | Path | None = None,
) -> LayerChoice:
    """Extract the features the choice needs and pick the layer pair (``layer_scores.*`` go to ``output_dir``)."""
    vis, txt = encoder.vision, encoder.text
    li, lt = preset_layers(encoder, opts, image_layer, text_layer)
    best = opts.mode == "best"
    layers_i = list(range(vis.num_layers)) if best else [li]
    layers_t = list(range(txt.num_layers)) if best else [lt]
    img = extractor.encode(encoder, table, "image", layers_i)
    tx = extractor.encode(encoder, table, "text", layers_t)
    if not best:
        return LayerChoice(li, lt, img, tx)
    rows = selection_rows(table.row_image, table.row_text, int(opts.n_samples), opts.dedup, int(opts.seed))
    check_sample(len(rows), len(table), opts.as_dict())
    fi = {lv: np.asarray(img[lv][table.row_image[rows]]) for lv in layers_i}
    ft = {lv: np.asarray(tx[lv][table.row_text[rows]]) for lv in layers_t}
    out = output_dir if output_dir is not None and rank_zero_only.rank == 0 else None
    picked = select_layers(
        fi, ft, n_samples=len(rows), metric=opts.metric, k=opts.k, mode="best", seed=int(opts.seed), out_dir=out,
        names_img=vis.layer_names, names_txt=txt.layer_names, bootstrap=int(opts.bootstrap),
    )  # fmt: skip
    sample: dict[str, Any] = {
        "rows": len(rows),
        "unique_images": len(np.unique(table.row_image[rows])),
        "unique_captions": len(np.unique(table.row_text[rows])),
        "score": float(picked.scores.max()),
    }
    if picked.uncertainty is not None:
        sample["uncertainty"] = picked.summary()
    return LayerChoice(picked.image_layer, picked.text_layer, img, tx, sample)


def check_sample(n: int, n_pairs: int, sel: Mapping[str, Any]) -> None:
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


def write_selection_record(
    info: Mapping[str, int],
    opts: SelectionOptions,
    features: str,
    sample: Mapping[str, Any] | None,
    table: PairItems | None,
    output_dir: str | Path | None,
) -> dict[str, int]:
    """Log what the run aligns and write ``<output_dir>/selection.json`` (rank 0); returns ``info``."""
    summary: dict[str, Any] = {**info, "selection": opts.as_dict(), "features": features}
    summary.update(sample or {})  # score, the scored sample after dedup, bootstrap uncertainty
    if table is not None:
        summary.update(pairs=len(table), images=len(table.image_ids), captions=len(table.texts))
    log.info("frozen-encoder data: %s", summary)
    if output_dir is not None:
        _write_json(Path(output_dir) / "selection.json", summary)
    return dict(info)


@rank_zero_only
def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))
