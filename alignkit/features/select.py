"""Layer-pair selection (STRUCTURE): score every (image layer, text layer) pair on a random subset of training
pairs and align the best pair (or the last layers, the "Last" baseline)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from alignkit.features.similarity import KRule, Metric, layer_similarity_matrix

log = logging.getLogger(__name__)

__all__ = ["select_layers", "write_scores"]

LayerFeats = Sequence[Tensor | np.ndarray] | Mapping[int, Tensor | np.ndarray] | Tensor | np.ndarray


def _as_layers(feats: LayerFeats) -> tuple[list[int], list[Tensor | np.ndarray]]:
    """Layer ids and per-layer (N, D) arrays from a list, a {layer: array} mapping, or one (N, L, D) array."""
    if isinstance(feats, Mapping):
        ids = sorted(feats)
        return ids, [feats[i] for i in ids]
    if isinstance(feats, (Tensor, np.ndarray)) and feats.ndim == 3:
        return list(range(feats.shape[1])), [feats[:, i] for i in range(feats.shape[1])]
    return list(range(len(feats))), list(feats)


def _rows(x: Tensor | np.ndarray, idx: np.ndarray) -> Tensor:
    if isinstance(x, Tensor):
        return x[torch.from_numpy(idx)].float()
    return torch.from_numpy(
        np.asarray(x[np.sort(idx)] if isinstance(x, np.memmap) else x[idx], dtype=np.float32)
    )


def select_layers(
    feats_img: LayerFeats,
    feats_txt: LayerFeats,
    n_samples: int = 5000,
    metric: Metric = "mutual_knn",
    k: KRule = "rice",
    mode: Literal["best", "last"] = "best",
    seed: int = 0,
    out_dir: str | Path | None = None,
    names_img: Sequence[str] | None = None,
    names_txt: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> tuple[int, int, Tensor]:
    """Return ``(image_layer, text_layer, scores)`` with ``scores[a, b]`` for every pair of listed layers.

    Row ``r`` of every image layer must be paired with row ``r`` of every text layer. ``n_samples`` random rows
    (seeded; all rows when fewer) are scored. ``mode="last"`` returns the last layers (the scores are still
    computed and written). With ``out_dir`` the matrix goes to ``layer_scores.csv`` and ``layer_scores.png``.
    """
    ids_i, fi = _as_layers(feats_img)
    ids_t, ft = _as_layers(feats_txt)
    n = fi[0].shape[0]
    if ft[0].shape[0] != n:
        raise ValueError(
            f"image features have {n} rows but text features {ft[0].shape[0]}; rows must be paired"
        )
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=n_samples, replace=False)) if n > n_samples else np.arange(n)
    scores = layer_similarity_matrix(
        [_rows(f, idx) for f in fi], [_rows(f, idx) for f in ft], metric=metric, k=k, device=device
    )
    if mode == "best":
        flat = int(scores.argmax())
        a, b = divmod(flat, scores.shape[1])
    elif mode == "last":
        a, b = len(ids_i) - 1, len(ids_t) - 1
    else:
        raise ValueError(f"mode must be 'best' or 'last', got {mode!r}")
    li, lt = ids_i[a], ids_t[b]
    log.info("layer selection (%s, %s, n=%d): image layer %d, text layer %d, score %.4f", metric, mode, len(idx), li,
             lt, scores[a, b])  # fmt: skip
    if out_dir is not None:
        write_scores(scores, out_dir, ids_i, ids_t, names_img, names_txt, chosen=(a, b), metric=metric)
    return li, lt, scores


def write_scores(
    scores: Tensor,
    out_dir: str | Path,
    ids_img: Sequence[int],
    ids_txt: Sequence[int],
    names_img: Sequence[str] | None = None,
    names_txt: Sequence[str] | None = None,
    chosen: tuple[int, int] | None = None,
    metric: str = "score",
) -> tuple[Path, Path]:
    """Write ``layer_scores.csv`` (long format) and the ``layer_scores.png`` heat-map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names_img = list(names_img) if names_img else [str(i) for i in ids_img]
    names_txt = list(names_txt) if names_txt else [str(i) for i in ids_txt]
    csv_path, png_path = out / "layer_scores.csv", out / "layer_scores.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_layer", "text_layer", "image_name", "text_name", metric])
        for a, li in enumerate(ids_img):
            for b, lt in enumerate(ids_txt):
                w.writerow([li, lt, names_img[a], names_txt[b], f"{float(scores[a, b]):.6f}"])
    # at least 6 x 4.5 in, so a handful of layers still leaves room for the title, legend and labels
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.35 * len(ids_txt)), max(4.5, 1.8 + 0.3 * len(ids_img))))
    im = ax.imshow(scores.numpy(), origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(ids_txt)), names_txt, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(ids_img)), names_img, fontsize=8)
    ax.set_xlabel("text layer")
    ax.set_ylabel("image layer")
    ax.set_title(f"Layer-pair alignment ({metric}) between the image and text towers", fontsize=10)
    if chosen is not None:
        a, b = chosen
        label = f"selected: image {names_img[a]} / text {names_txt[b]} ({float(scores[a, b]):.3f})"
        ax.scatter([b], [a], marker="*", s=160, c="red", edgecolors="white", linewidths=0.8, label=label)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, frameon=False)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120, bbox_inches="tight")  # keeps the legend below the axes in the image
    plt.close(fig)
    return csv_path, png_path
