"""Layer-pair selection (STRUCTURE): score every (image layer, text layer) pair on a sample of training pairs and
align the best pair (or the last layers, the "Last" baseline).

Two guards against a pick decided by noise:

* **Deduplicated sample** (:func:`selection_rows`). Mutual kNN compares neighbour sets. When a caption (or an
  image) occurs in many rows, those rows are exact ties at cosine 1 in *every* layer, so each such row's
  neighbour set is an arbitrary slice of its copies, the same slice in every layer. Templated captions (a few
  templates × a few classes) make most text-side neighbourhoods such ties and the scores of all text layers nearly
  equal. ``dedup`` keeps each unique image and/or caption at most once in the scored sample.
* **Bootstrap** (:func:`bootstrap_scores`). The mutual-kNN score is a mean over samples of per-sample overlaps;
  resampling the samples with replacement gives each pair's standard error, how often each pair would be picked,
  and a confidence interval for the difference between the pick and the last-layer pair. It is conditional on the
  neighbour graphs of the scored sample: they are not recomputed per replicate, because a resample with
  replacement would re-create exactly the duplicate ties that the dedup removes.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from alignkit.features.similarity import KRule, Metric, layer_similarity_matrix, mutual_knn_per_sample

log = logging.getLogger(__name__)

__all__ = ["LayerSelection", "bootstrap_scores", "select_layers", "selection_rows", "write_scores"]

LayerFeats = Sequence[Tensor | np.ndarray] | Mapping[int, Tensor | np.ndarray] | Tensor | np.ndarray
Dedup = Literal["none", "images", "captions", "both"]
DEDUP = ("none", "images", "captions", "both")


class LayerSelection(NamedTuple):
    """The picked pair (layer ids), the (La, Lb) score matrix and the bootstrap summary (None without one)."""

    image_layer: int
    text_layer: int
    scores: Tensor
    uncertainty: dict[str, Any] | None

    def summary(self) -> dict[str, Any] | None:
        """The bootstrap numbers about the pick itself (for ``selection.json``): no per-pair matrices."""
        if self.uncertainty is None:
            return None
        u = self.uncertainty
        keys = ("method", "n_boot", "ci", "pick_std", "reference_layers", "reference_score", "reference_std",
                "difference", "difference_ci", "distinguishable")  # fmt: skip
        return {**{k: u[k] for k in keys}, "pick_frequency": max(max(r) for r in u["pick_frequency"])}


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


def selection_rows(
    row_image: np.ndarray | Sequence[int],
    row_text: np.ndarray | Sequence[int],
    n_samples: int,
    dedup: Dedup = "both",
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices of the rows (pairs) to score.

    ``row_image[r]`` / ``row_text[r]`` identify row r's unique image / caption. ``dedup="none"``: ``n_samples``
    seeded random rows (all when fewer). Otherwise the rows are visited in a seeded random order and a row is kept
    only if its image (``images``), its caption (``captions``) or neither of them (``both``) was kept before; the
    first ``n_samples`` kept rows are scored.
    """
    if dedup not in DEDUP:
        raise ValueError(f"data.selection.dedup={dedup!r} is not one of {list(DEDUP)}")
    ri, rt = np.asarray(row_image), np.asarray(row_text)
    if ri.ndim != 1 or ri.shape != rt.shape:
        raise ValueError(f"row_image {ri.shape} and row_text {rt.shape} must be 1-D and of equal length")
    n = len(ri)
    rng = np.random.default_rng(seed)
    if dedup == "none":
        return np.sort(rng.choice(n, size=n_samples, replace=False)) if n > n_samples else np.arange(n)
    check_i, check_t = dedup in ("images", "both"), dedup in ("captions", "both")
    seen_i: set[int] = set()
    seen_t: set[int] = set()
    keep: list[int] = []
    for r in rng.permutation(n):
        i, t = int(ri[r]), int(rt[r])
        if (check_i and i in seen_i) or (check_t and t in seen_t):
            continue
        keep.append(int(r))
        seen_i.add(i)
        seen_t.add(t)
        if len(keep) == n_samples:
            break
    return np.sort(np.asarray(keep, dtype=np.int64))


def bootstrap_scores(
    per_sample: Tensor,
    chosen: tuple[int, int],
    reference: tuple[int, int],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap over samples of (La, Lb, n) per-sample scores whose mean over samples is the score matrix.

    Returns plain lists / numbers: ``std`` (La, Lb) bootstrap standard errors; ``pick_frequency`` (La, Lb) the
    share of replicates in which each pair scores highest; ``tied_with_pick`` (La, Lb) whether the ``ci`` interval
    of (chosen − pair) reaches 0; and, for ``chosen`` against ``reference`` (the last-layer pair), the score
    ``difference``, its ``difference_ci`` and ``distinguishable`` (the whole interval above 0).
    """
    if n_boot < 2:
        raise ValueError(f"the bootstrap needs at least 2 replicates, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    la, lb, n = per_sample.shape
    flat = per_sample.reshape(la * lb, n).double()
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (n_boot, n), generator=g)
    # Replicate means as (how often each sample was drawn) @ (per-sample scores): every pair at once.
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    counts.scatter_add_(1, draws, torch.ones(n_boot, n, dtype=torch.float64))
    boot = (counts @ flat.T / n).view(n_boot, la, lb)
    a, b = chosen
    # Differences from the per-sample differences (not from the replicate means), so identical pairs give exactly 0.
    diff_all = (counts @ (flat[a * lb + b] - flat).T / n).view(n_boot, la, lb)  # chosen minus every pair
    lo_q, hi_q = (1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0
    tied = torch.quantile(diff_all.reshape(n_boot, -1), lo_q, dim=0).view(la, lb) <= 0.0
    freq = torch.bincount(boot.reshape(n_boot, -1).argmax(dim=1), minlength=la * lb).double() / n_boot
    diff = diff_all[:, reference[0], reference[1]]
    lo, hi = float(torch.quantile(diff, lo_q)), float(torch.quantile(diff, hi_q))
    return {
        "method": "bootstrap over the scored samples (neighbour graphs fixed)",
        "n_boot": n_boot,
        "ci": ci,
        "std": boot.std(dim=0).tolist(),
        "pick_frequency": freq.view(la, lb).tolist(),
        "tied_with_pick": tied.tolist(),
        "pick_std": float(boot[:, a, b].std()),
        "reference": list(reference),
        "reference_score": float(per_sample[reference[0], reference[1]].mean()),
        "reference_std": float(boot[:, reference[0], reference[1]].std()),
        "difference": float(per_sample[a, b].mean() - per_sample[reference[0], reference[1]].mean()),
        "difference_ci": [lo, hi],
        "distinguishable": bool(lo > 0.0) and tuple(chosen) != tuple(reference),
    }


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
    bootstrap: int = 1000,
    ci: float = 0.95,
) -> LayerSelection:
    """Score every pair of listed layers and pick one; returns a :class:`LayerSelection`.

    Row ``r`` of every image layer must be paired with row ``r`` of every text layer. ``n_samples`` random rows
    (seeded; all rows when fewer) are scored: deduplicate the rows first with :func:`selection_rows`.
    ``mode="last"`` returns the last layers (the scores are still computed and written). ``bootstrap`` replicates
    (mutual kNN only; 0 turns it off) give the uncertainty of the pick; a warning says when the pick is not
    distinguishable from the last-layer pair. With ``out_dir`` the matrix goes to ``layer_scores.csv`` / ``.png``.
    """
    ids_i, fi = _as_layers(feats_img)
    ids_t, ft = _as_layers(feats_txt)
    n = fi[0].shape[0]
    if ft[0].shape[0] != n:
        raise ValueError(
            f"image features have {n} rows but text features {ft[0].shape[0]}; rows must be paired"
        )
    if mode not in ("best", "last"):
        raise ValueError(f"mode must be 'best' or 'last', got {mode!r}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=n_samples, replace=False)) if n > n_samples else np.arange(n)
    xs = [_rows(f, idx).to(device) for f in fi]
    ys = [_rows(f, idx).to(device) for f in ft]
    per_sample = None
    if metric == "mutual_knn":
        per_sample = mutual_knn_per_sample(xs, ys, k)
        scores = per_sample.mean(dim=2)
    else:
        scores = layer_similarity_matrix(xs, ys, metric=metric, k=k, device=device)
    last = (len(ids_i) - 1, len(ids_t) - 1)
    a, b = divmod(int(scores.argmax()), scores.shape[1]) if mode == "best" else last
    li, lt = ids_i[a], ids_t[b]
    log.info("layer selection (%s, %s, n=%d): image layer %d, text layer %d, score %.4f", metric, mode, len(idx), li,
             lt, scores[a, b])  # fmt: skip
    unc = None
    if per_sample is not None and bootstrap:
        unc = bootstrap_scores(per_sample, (a, b), last, n_boot=bootstrap, ci=ci, seed=seed)
        unc["reference_layers"] = [ids_i[last[0]], ids_t[last[1]]]
        _log_uncertainty(unc, (li, lt), float(scores[a, b]), (a, b) == last)
    elif bootstrap:
        log.info("layer selection: no bootstrap for %s (per-sample terms exist for mutual_knn only)", metric)
    if out_dir is not None:
        write_scores(scores, out_dir, ids_i, ids_t, names_img, names_txt, chosen=(a, b), metric=metric,
                     uncertainty=unc)  # fmt: skip
    return LayerSelection(li, lt, scores, unc)


def _log_uncertainty(unc: dict[str, Any], pick: tuple[int, int], score: float, is_last: bool) -> None:
    lo, hi = unc["difference_ci"]
    pct = round(100 * unc["ci"])
    freq = max(max(r) for r in unc["pick_frequency"])
    log.info("layer selection: pick score %.4f ± %.4f (bootstrap s.e.); the top pair in %.0f%% of %d replicates",
             score, unc["pick_std"], 100 * freq, unc["n_boot"])  # fmt: skip
    if is_last:
        return
    ref = tuple(unc["reference_layers"])
    if unc["distinguishable"]:
        log.info("layer selection: the pick %s beats the last-layer pair %s by %.4f (%d%% CI [%.4f, %.4f])",
                 pick, ref, unc["difference"], pct, lo, hi)  # fmt: skip
    else:
        log.warning(
            "layer selection: the pick %s is NOT distinguishable from the last-layer pair %s: score difference "
            "%.4f, %d%% bootstrap CI [%.4f, %.4f] contains 0", pick, ref, unc["difference"], pct, lo, hi,
        )  # fmt: skip


def write_scores(
    scores: Tensor,
    out_dir: str | Path,
    ids_img: Sequence[int],
    ids_txt: Sequence[int],
    names_img: Sequence[str] | None = None,
    names_txt: Sequence[str] | None = None,
    chosen: tuple[int, int] | None = None,
    metric: str = "score",
    uncertainty: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``layer_scores.csv`` (long format; with ``uncertainty`` also each pair's bootstrap s.e., pick
    frequency and tie with the pick) and the ``layer_scores.png`` heat-map (pick ★, last pair ◆, pairs tied with
    the pick outlined, the pick-vs-last difference and its interval in the title)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names_img = list(names_img) if names_img else [str(i) for i in ids_img]
    names_txt = list(names_txt) if names_txt else [str(i) for i in ids_txt]
    csv_path, png_path = out / "layer_scores.csv", out / "layer_scores.png"
    extra = ["bootstrap_std", "pick_frequency", "tied_with_pick"] if uncertainty else []
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_layer", "text_layer", "image_name", "text_name", metric, *extra])
        for a, li in enumerate(ids_img):
            for b, lt in enumerate(ids_txt):
                row = [li, lt, names_img[a], names_txt[b], f"{float(scores[a, b]):.6f}"]
                if uncertainty:
                    row += [f"{uncertainty['std'][a][b]:.6f}", f"{uncertainty['pick_frequency'][a][b]:.4f}",
                            int(uncertainty["tied_with_pick"][a][b])]  # fmt: skip
                w.writerow(row)
    # at least 6 x 4.5 in, so a handful of layers still leaves room for the title, legend and labels
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 0.35 * len(ids_txt)), max(4.5, 1.8 + 0.3 * len(ids_img))))
    im = ax.imshow(scores.numpy(), origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(ids_txt)), names_txt, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(ids_img)), names_img, fontsize=8)
    ax.set_xlabel("text layer")
    ax.set_ylabel("image layer")
    title = f"Layer-pair alignment ({metric}) between the image and text towers"
    if uncertainty:
        for a in range(len(ids_img)):
            for b in range(len(ids_txt)):
                if uncertainty["tied_with_pick"][a][b]:
                    ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, ec="white", lw=1.2))
        lo, hi = uncertainty["difference_ci"]
        verdict = "distinguishable" if uncertainty["distinguishable"] else "NOT distinguishable"
        title += (
            f"\nselected − last pair = {uncertainty['difference']:+.4f}, {round(100 * uncertainty['ci'])}% CI "
            f"[{lo:+.4f}, {hi:+.4f}]: {verdict}\nselected s.e. {uncertainty['pick_std']:.4f} (bootstrap); "
            "outlined: pairs tied with the selected one"
        )
    ax.set_title(title, fontsize=9)
    ax.scatter(
        [len(ids_txt) - 1], [len(ids_img) - 1], marker="D", s=40, facecolors="none", edgecolors="orange",
        label="last layers",
    )  # fmt: skip
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
