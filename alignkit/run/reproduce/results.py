"""Write a reproduction's ``results.json``, ``results.md`` (the table, mean ± std over seeds) and ``results.png``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignkit.eval.report import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["render_table", "write_results"]

SHORT = {
    "zs/fashion_mnist/top1": "FM zero-shot top-1",
    "ret/openclipart/i2t_r@1": "clip-art i2t R@1",
    "ret/openclipart/t2i_r@1": "clip-art t2i R@1",
    "gap/openclipart/l2": "gap ‖μ_img − μ_txt‖₂",
    "gap/openclipart/sq_per_dim": "gap ‖·‖²/d ×10³",
}


def _cell(row: str, metric: str, rows: Mapping, std: Mapping, n_seeds: int) -> str:
    v = rows.get(row, {}).get(metric)
    if v is None:
        return "–"
    scale = 1e3 if metric.endswith("sq_per_dim") else 1.0
    s = std.get(row, {}).get(metric)
    return f"{v * scale:.3f}" + (f" ± {s * scale:.3f}" if s is not None and n_seeds > 1 else "")


def render_table(payload: Mapping[str, Any], metrics: Sequence[str]) -> str:
    """Markdown table: one line per row, test-split metrics (mean ± std over the row's seeds)."""
    rows, meta = payload["rows"], payload.get("meta", {})
    std, seeds = meta.get("std", {}), meta.get("seeds", {})
    cols = [*metrics, "gap/openclipart/sq_per_dim"]
    head = "| row | seeds | " + " | ".join(SHORT.get(m, m) for m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for row in rows:
        n = len(seeds.get(row, [])) or 1
        cells = " | ".join(_cell(row, m, rows, std, n) for m in cols)
        lines.append(f"| `{row}` | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def _plot(payload: Mapping[str, Any], metrics: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, std = payload["rows"], payload.get("meta", {}).get("std", {})
    names = list(rows)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics), 0.32 * len(names) + 1.6), sharey=True
    )
    for ax, m in zip(axes, metrics, strict=True):
        vals = [rows[n].get(m, float("nan")) for n in names]
        errs = [std.get(n, {}).get(m, 0.0) for n in names]
        colors = ["tab:blue" if n.startswith("A/") else "tab:orange" for n in names]
        ax.barh(range(len(names)), vals, xerr=errs, color=colors, capsize=2)
        ax.set_title(SHORT.get(m, m), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(
        "offline replication (test split; blue: frozen encoders, orange: CLIP-Refine family)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: str | Path, payload: Mapping[str, Any], metrics: Sequence[str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str))
    meta = payload.get("meta", {})
    md = [
        "# Offline replication (test split)\n",
        render_table(payload, metrics),
        "\nChoices made on the validation split:\n",
        *(f"* {k}: {json.dumps(v, default=str)}\n" for k, v in meta.get("choices", {}).items()),
        f"\nSelected layers (image/text) per Part A row: {json.dumps(meta.get('layers', {}))}\n",
        *(f"\nPartial: {json.dumps(meta['partial'])}\n",) * bool(meta.get("partial")),
        f"\nTotal time: {meta.get('total_seconds', '?')} s\n",
    ]
    atomic_write_text(out / "results.md", "".join(md))
    try:
        _plot(payload, metrics, out / "results.png")
    except ImportError as err:  # matplotlib is an optional extra
        log.warning("no results.png: %s", err)
