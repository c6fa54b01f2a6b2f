"""Evaluate during training: zero-shot, retrieval and modality gap before training, every N steps, at the end.

Works with any training module that exposes ``eval_interface() -> (model, tokenizer, preprocess)``.
Every rank encodes its strided slice of each eval set and the slices are all-gathered
(:func:`alignkit.eval.encode.encode_eval_set`), so no rank idles at a barrier while rank 0 works; every rank
then holds the same metrics, rank 0 logs them and writes the files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

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

log = logging.getLogger(__name__)

FIRST_EMBEDDINGS_FILE = (
    "embeddings_first.pt"  # the plot set at the first evaluation, for a resumed run's plot
)
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class EvaluationCallback(Callback):
    """Evaluate ``evalsets`` at step 0, every ``every_n_steps`` optimizer steps, and after the last step.

    Args:
        evalsets: name -> eval set (:class:`ClassificationSet` / :class:`RetrievalSet`); the name is used in
            the metric keys ``val/zs/<name>/top1``, ``val/ret/<name>/i2t_r@1``, ``val/gap/<name>/l2``.
            Empty or None: the callback does nothing.
        every_n_steps: evaluate when ``global_step`` is a multiple of this; 0 turns periodic evaluation off.
        at_start / at_end: evaluate before the first step / after the last one.
        batch_size: per-rank encoding batch size.
        plot_set: the set drawn in ``embeddings.png`` (default: the first retrieval set, else the first set).
        output_dir: where ``metrics.json``, ``report.md`` and ``embeddings.png`` go (default: the trainer's
            ``default_root_dir``).
        prefix: metric-name prefix for the loggers and ``metrics.json``.

    Metrics are also put into ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="val/zs/x/top1")``
    works). A resumed run reloads ``metrics.json`` and drops entries after the resume step, whose weights
    were never checkpointed.
    """

    def __init__(
        self,
        evalsets: Mapping[str, EvalSet] | None = None,
        every_n_steps: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        batch_size: int = 64,
        plot_set: str | None = None,
        output_dir: str | None = None,
        prefix: str = "val/",
    ) -> None:
        super().__init__()
        self.evalsets = build_evalsets(evalsets)
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.batch_size, self.prefix = batch_size, prefix
        self.plot_set = choose_plot_set(self.evalsets, plot_set) if self.evalsets else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.history: dict[int, dict[str, float]] = {}
        self._first: tuple[int, EncodedEvalSet] | None = None
        self._last: tuple[int, EncodedEvalSet] | None = None
        self._last_step: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.evalsets)

    def _dir(self, trainer: L.Trainer) -> Path:
        return self.output_dir or Path(trainer.default_root_dir)

    # ----- hooks -----
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        if step > 0:
            self._restore(trainer, step)
        if self.at_start and step not in self.history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs several times per optimizer step: evaluate once.
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        if self.enabled and due and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        # A run stopped by a signal (preemption callback) is not at its end: no "final" evaluation (the grace
        # time before the kill is short) and the report says it is interrupted.
        stopper = next((c for c in trainer.callbacks if getattr(c, "preempted", False)), None)
        if self.at_end and stopper is None and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            by = None if stopper is None else (getattr(stopper, "received_name", None) or "a signal")
            self.write_report(trainer, interrupted_by=by)

    # ----- work -----
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate every set now (all ranks), record, log and write ``metrics.json``; returns the metrics."""
        step = trainer.global_step
        model, tokenizer, preprocess = pl_module.eval_interface()
        metrics, kept = evaluate_sets(
            model,
            tokenizer,
            preprocess,
            self.evalsets,
            batch_size=self.batch_size,
            device=pl_module.device,
            autocast_dtype=_AUTOCAST.get(str(trainer.precision)),
            keep=[self.plot_set] if self.plot_set else [],
        )
        metrics = {self.prefix + k: v for k, v in metrics.items()}
        self.history[step] = metrics
        self._last_step = step
        if self.plot_set in kept:
            self._last = (step, kept[self.plot_set])
            if self._first is None:
                self._first = self._last
                if trainer.is_global_zero:
                    enc = self._first[1]
                    self._dir(trainer).mkdir(parents=True, exist_ok=True)
                    torch.save(
                        {"step": step, "set": self.plot_set, "task": enc.task, "image": enc.image}
                        | {"text": enc.text, "targets": enc.targets},
                        self._dir(trainer) / FIRST_EMBEDDINGS_FILE,
                    )
        # Every rank holds the same values (gathered), so monitors agree across ranks.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
            save_history(self.history, self._dir(trainer) / METRICS_FILE)
            log.info("step %d: %s", step, _headline(metrics))
        return metrics

    def write_report(self, trainer: L.Trainer, interrupted_by: str | None = None) -> None:
        out = self._dir(trainer)
        plot = None
        if self._first is not None and self._last is not None:
            (s0, e0), (s1, e1) = self._first, self._last
            panels = {f"before (step {s0})": e0}
            if s1 != s0:
                panels[f"after (step {s1})"] = e1
            try:
                plot_embeddings(panels, out / PLOT_FILE, title=f"{self.plot_set}: image vs text (PCA)")
                plot = PLOT_FILE
            except ImportError as e:
                log.warning("no %s: %s", PLOT_FILE, e)
        details = {"run directory": str(out), "eval sets": ", ".join(self.evalsets)}
        if interrupted_by:
            details = {
                "status": f"INTERRUPTED by {interrupted_by} at step {trainer.global_step}: not the final model "
                "(last.ckpt written; resume with ckpt_path=auto)",
                **details,
            }
        if plot:
            details["projection"] = f"`{self.plot_set}`, both panels in the first step's PCA basis"
        title = "Evaluation report (interrupted)" if interrupted_by else "Evaluation report"
        atomic_write_text(out / REPORT_FILE, render_report(self.history, title, details, plot))
        log.info("wrote %s", out / REPORT_FILE)

    def _restore(self, trainer: L.Trainer, step: int) -> None:
        """Resumed run: keep the history up to the resume step and the first step's embeddings."""
        out = self._dir(trainer)
        self.history = {s: m for s, m in load_history(out / METRICS_FILE).items() if s <= step}
        first = out / FIRST_EMBEDDINGS_FILE
        if first.is_file():
            d = torch.load(first, weights_only=True)
            if d.get("set") == self.plot_set:
                enc = EncodedEvalSet(d["set"], d["task"], d["image"], d["text"], d["targets"])
                self._first = (int(d["step"]), enc)
        self._last_step = step if step in self.history else None


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


def _headline(metrics: Mapping[str, float]) -> str:
    """The few numbers worth a log line: top-1, R@1 and the L2 gap of each set."""
    keys = [k for k in metrics if k.endswith(("/top1", "_r@1", "/l2"))]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
