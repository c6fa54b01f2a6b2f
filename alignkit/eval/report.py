"""Evaluation outputs in a run directory: ``metrics.json``, ``report.md`` and ``embeddings.png``.

* ``metrics.json``: ``{"<step>": {"val/zs/<set>/top1": value, ...}, ...}``, rewritten atomically (temp file
  + rename) after every evaluation, so a reader or a killed job never sees half a file.
* ``report.md``: for each eval set, a table of every metric at the first and the last evaluated step, the
  change, and which direction is better.
* ``embeddings.png``: a 2-D PCA of one set's image and text embeddings, first and last step drawn in the
  first step's basis (so movement between panels is real movement, not a change of axes).

Pure file I/O on embeddings and metric dicts: used by the training callback and by ``eval.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path

import torch

from alignkit.data.evalsets import EvalSet, RetrievalSet
from alignkit.eval.encode import EncodedEvalSet
from alignkit.metrics import pca_2d

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "REPORT_FILE",
    "atomic_write_text",
    "choose_plot_set",
    "load_history",
    "plot_embeddings",
    "render_report",
    "save_history",
]

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PLOT_FILE = "embeddings.png"

History = dict[int, dict[str, float]]

# Which way is better, by the last component of the metric name (see docs/evaluation.md).
_HIGHER = ("top1", "top5", "mean_per_class_recall", "pos_cos")
_LOWER = ("l2", "sq_per_dim", "alignment", "uniformity_img", "uniformity_txt", "uniformity_all")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, then ``os.replace`` it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_history(history: Mapping[int, Mapping[str, float]], path: str | Path) -> None:
    data = {str(step): dict(sorted(history[step].items())) for step in sorted(history)}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def load_history(path: str | Path) -> History:
    """Read a ``metrics.json``; a missing file is an empty history."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(step): {k: float(v) for k, v in m.items()} for step, m in raw.items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a metrics.json (step -> metric -> value): {e}") from e


def _better(metric: str) -> str:
    last = metric.rsplit("/", 1)[-1]
    if last in _HIGHER or "_r@" in last:
        return "↑"
    return "↓" if last in _LOWER else ""


def _fmt(v: float, signed: bool = False) -> str:
    if v != v:  # NaN
        return "nan"
    sign = "+" if signed else ""
    return f"{v:{sign}.3e}" if v != 0 and abs(v) < 1e-2 else f"{v:{sign}.4f}"


def _split(key: str) -> tuple[str, str, str]:
    """``val/zs/fmnist/top1`` -> (set, kind, metric); keys with fewer parts fall under set "-"."""
    parts = key.split("/")
    if len(parts) >= 3:
        return parts[-2], parts[-3], parts[-1]
    return "-", "", key


def render_report(
    history: Mapping[int, Mapping[str, float]],
    title: str = "Evaluation report",
    details: Mapping[str, str] | None = None,
    plot: str | None = None,
) -> str:
    """Markdown: per eval set, every metric at the first and last step with the change."""
    steps = sorted(history)
    lines = [f"# {title}", ""]
    for k, v in (details or {}).items():
        lines.append(f"* **{k}:** {v}")
    if not steps:
        return "\n".join([*lines, "", "No evaluations were run (no eval sets configured).", ""])
    first, last = steps[0], steps[-1]
    lines.append(f"* **evaluated at steps:** {', '.join(map(str, steps))} (all values in `{METRICS_FILE}`)")
    lines.append("")
    keys = sorted(set(history[first]) | set(history[last]), key=lambda k: (_split(k)[0], k))
    by_set: dict[str, list[str]] = {}
    for k in keys:
        by_set.setdefault(_split(k)[0], []).append(k)
    compare = first != last
    for name, set_keys in by_set.items():
        lines += [f"## {name}", ""]
        if compare:
            lines += [
                f"| metric | before (step {first}) | after (step {last}) | change | better |",
                "|---|---:|---:|---:|:---:|",
            ]
        else:
            lines += [f"| metric | step {first} | better |", "|---|---:|:---:|"]
        for k in set_keys:
            _, kind, metric = _split(k)
            label = f"{kind}/{metric}" if kind else metric
            a, b = history[first].get(k), history[last].get(k)
            if compare:
                delta = _fmt(b - a, signed=True) if a is not None and b is not None else ""
                cells = [_fmt(a) if a is not None else "", _fmt(b) if b is not None else "", delta]
            else:
                cells = [_fmt(a) if a is not None else ""]
            lines.append(f"| {label} | {' | '.join(cells)} | {_better(k)} |")
        lines.append("")
    lines += [
        "`zs/`: zero-shot classification; `ret/`: retrieval recall@k (hit rate); `gap/`: modality gap "
        "(`l2`, `sq_per_dim`), alignment, positive cosine and uniformity (lower = more uniform). "
        "Definitions: docs/evaluation.md.",
        "",
    ]
    if plot:
        lines += [f"![2-D PCA of image and text embeddings]({plot})", ""]
    return "\n".join(lines)


def choose_plot_set(evalsets: Mapping[str, EvalSet], requested: str | None = None) -> str | None:
    """``requested`` if given (must exist), else the first retrieval (paired) set, else the first set."""
    if requested is not None:
        if requested not in evalsets:
            raise ValueError(f"plot_set={requested!r} is not one of the eval sets {sorted(evalsets)}")
        return requested
    for name, s in evalsets.items():
        if isinstance(s, RetrievalSet):
            return name
    return next(iter(evalsets), None)


def _arrays(enc: EncodedEvalSet) -> tuple[torch.Tensor, torch.Tensor]:
    # Classification text is (C, T, d): draw every prompt.
    return enc.image, enc.text.reshape(-1, enc.text.shape[-1])


def plot_embeddings(panels: Mapping[str, EncodedEvalSet], path: str | Path, title: str | None = None) -> Path:
    """One scatter per panel (e.g. {"before (step 0)": enc0, "after (step 64)": enc1}), all in the PCA basis
    of the first panel, with the image and text centroids marked. Needs matplotlib (the ``eval`` extra)."""
    try:
        from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch
    except ImportError as e:
        raise ImportError("embeddings.png needs matplotlib: pip install 'alignkit[eval]'") from e
    items = list(panels.items())
    basis = pca_2d(*_arrays(items[0][1]))
    projs = [(label, pca_2d(*_arrays(enc), basis=basis)) for label, enc in items]
    allpts = torch.cat([torch.cat([p.image, p.text]) for _, p in projs])
    lo, hi = allpts.min(0).values, allpts.max(0).values
    pad = 0.05 * (hi - lo).clamp_min(1e-6)
    fig = Figure(figsize=(4.2 * len(projs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(projs), squeeze=False)[0]
    for ax, (label, p) in zip(axes, projs):
        ax.scatter(p.image[:, 0], p.image[:, 1], s=8, alpha=0.6, c="tab:blue", label="image")
        ax.scatter(p.text[:, 0], p.text[:, 1], s=8, alpha=0.6, c="tab:orange", marker="^", label="text")
        ci, ct = p.image.mean(0), p.text.mean(0)
        ax.scatter([ci[0]], [ci[1]], s=120, c="navy", marker="X", label="image centroid")
        ax.scatter([ct[0]], [ct[1]], s=120, c="darkred", marker="X", label="text centroid")
        ax.plot([ci[0], ct[0]], [ci[1], ct[1]], c="k", lw=1, ls="--")
        ax.set_title(label)
        ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
        ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0].legend(loc="best", fontsize=7)
    if title:
        # wrapped to the figure's width: a one-panel figure (eval.py) is too narrow for a long title on one line
        fig.suptitle(textwrap.fill(title, width=int(11 * 4.2 * len(projs))), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    return path
