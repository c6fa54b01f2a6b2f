"""One evaluation recorder, shared by the training callback and ``eval.py``.

It owns what both do the same way: building the eval sets from their nodes, the autocast dtype, the metric-name
prefix, the history of evaluations (``metrics.json``), the plot set's first and last embeddings, ``report.md`` and
``embeddings.png``. The callback adds only what Lightning needs (when to evaluate, loggers, ``callback_metrics``);
``eval.py`` adds only model loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.data.evalsets import ClassificationSet, EvalSet, RetrievalSet
from alignkit.eval.encode import EncodedEvalSet, evaluate_sets
from alignkit.eval.report import (
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    atomic_write_text,
    choose_plot_set,
    load_history,
    plot_embeddings,
    render_report,
    save_history,
)

__all__ = ["FIRST_EMBEDDINGS_FILE", "EvalRecorder", "autocast_dtype", "build_evalsets"]

log = logging.getLogger(__name__)

FIRST_EMBEDDINGS_FILE = (
    "embeddings_first.pt"  # the plot set at the first evaluation, for a resumed run's plot
)

# Lightning precision strings (the trainer's) and eval.py's ``autocast`` option name the same two dtypes.
_AUTOCAST = {
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "fp16": torch.float16,
}


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype for a mixed precision (``bf16-mixed`` / ``bf16``, ``16-mixed`` / ``fp16``), else None."""
    return None if precision is None else _AUTOCAST.get(str(precision))


def build_evalsets(evalsets: Mapping[str, Any] | None) -> dict[str, EvalSet]:
    """name -> eval set; values may be eval sets or Hydra nodes with a ``_target_`` that builds one.

    The callback's Hydra node sets ``_recursive_: false``: Hydra would otherwise build the eval sets and then
    convert the (dataclass) results back into configs, copying every image into OmegaConf.
    """
    out: dict[str, EvalSet] = {}
    for name, value in (evalsets or {}).items():
        if isinstance(value, Mapping) and "_target_" in value:
            from hydra.utils import instantiate

            value = instantiate(value)
        if not isinstance(value, ClassificationSet | RetrievalSet):
            raise TypeError(
                f"evalsets.{name} is a {type(value).__name__}, not an eval set; its node must build one "
                f"(e.g. _target_: alignkit.data.evalsets.load_eval_set, path: ...)"
            )
        out[str(name)] = value
    return out


class EvalRecorder:
    """Evaluate eval sets at given steps and keep what the outputs need.

    Args:
        evalsets: name -> eval set or a Hydra node building one (see :func:`build_evalsets`).
        batch_size: per-rank encoding batch size.
        plot_set: the set drawn in ``embeddings.png`` (default: the first retrieval set, else the first set).
        prefix: metric-name prefix (``val/`` gives ``val/zs/<set>/top1``, ``val/ret/<set>/i2t_r@1``, ...).
    """

    def __init__(
        self,
        evalsets: Mapping[str, Any] | None,
        batch_size: int = 64,
        plot_set: str | None = None,
        prefix: str = "val/",
    ) -> None:
        self.evalsets = build_evalsets(evalsets)
        self.batch_size = batch_size
        self.prefix = prefix
        self.plot_set = choose_plot_set(self.evalsets, plot_set) if self.evalsets else None
        self.history: dict[int, dict[str, float]] = {}
        self.first: tuple[int, EncodedEvalSet] | None = (
            None  # (step, plot-set embeddings) of the first evaluation
        )
        self.last: tuple[int, EncodedEvalSet] | None = None

    def evaluate(
        self,
        model: nn.Module,
        tokenizer: Callable,
        preprocess: Callable,
        step: int,
        device: str | torch.device,
        precision: str | None = None,
    ) -> dict[str, float]:
        """Evaluate every set now (every rank must call this: it gathers), record it under ``step``, return it."""
        metrics, kept = evaluate_sets(
            model,
            tokenizer,
            preprocess,
            self.evalsets,
            batch_size=self.batch_size,
            device=device,
            autocast_dtype=autocast_dtype(precision),
            keep=[self.plot_set] if self.plot_set else [],
        )
        metrics = {self.prefix + k: v for k, v in metrics.items()}
        self.history[step] = metrics
        if self.plot_set in kept:
            self.last = (step, kept[self.plot_set])
            if self.first is None:
                self.first = self.last
        return metrics

    # ----- files in the output directory (call on one rank) -----
    def save_history(self, out: Path) -> None:
        save_history(self.history, out / METRICS_FILE)

    def save_first_embeddings(self, out: Path) -> None:
        if self.first is None:
            return
        step, enc = self.first
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"step": step, "set": self.plot_set, "task": enc.task, "image": enc.image}
            | {"text": enc.text, "targets": enc.targets},
            out / FIRST_EMBEDDINGS_FILE,
        )

    def restore(self, out: Path, step: int) -> None:
        """Resumed run: keep the history up to ``step`` (later entries came from weights never checkpointed) and
        the first evaluation's embeddings."""
        self.history = {s: m for s, m in load_history(out / METRICS_FILE).items() if s <= step}
        first = out / FIRST_EMBEDDINGS_FILE
        if first.is_file():
            d = torch.load(first, weights_only=True)
            if d.get("set") == self.plot_set:
                enc = EncodedEvalSet(d["set"], d["task"], d["image"], d["text"], d["targets"])
                self.first = (int(d["step"]), enc)

    def before_after_panels(self) -> dict[str, EncodedEvalSet]:
        """The plot panels of a training run: the first evaluation and, if later, the last."""
        if self.first is None or self.last is None:
            return {}
        (s0, e0), (s1, e1) = self.first, self.last
        panels = {f"before (step {s0})": e0}
        if s1 != s0:
            panels[f"after (step {s1})"] = e1
        return panels

    def write_report(
        self,
        out: Path,
        details: Mapping[str, str],
        panels: Mapping[str, EncodedEvalSet] | None = None,
        title: str = "Evaluation report",
    ) -> Path:
        """``embeddings.png`` of ``panels`` (default: a training run's before / after) and ``report.md``."""
        before_after = panels is None
        panels = self.before_after_panels() if before_after else panels
        plot = None
        if panels:
            try:
                plot_embeddings(panels, out / PLOT_FILE, title=f"{self.plot_set}: image vs text (PCA)")
                plot = PLOT_FILE
            except ImportError as e:
                log.warning("no %s: %s", PLOT_FILE, e)
        details = {**details, "eval sets": ", ".join(self.evalsets)}
        if plot and before_after:
            details["projection"] = f"`{self.plot_set}`, both panels in the first step's PCA basis"
        atomic_write_text(out / REPORT_FILE, render_report(self.history, title, details, plot))
        return out / REPORT_FILE


def headline(metrics: Mapping[str, float]) -> str:
    """The few numbers worth a log line: top-1, R@1 and the L2 gap of each set."""
    keys = [k for k in metrics if k.endswith(("/top1", "_r@1", "/l2"))]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
