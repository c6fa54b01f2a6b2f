"""Evaluate the module's ``eval_interface()`` before and after fit and write ``metrics.json`` to the run dir.

A stop-gap until the evaluation callback lands: all the work is :func:`run_eval` (one call to
``alignkit.evaluate.evaluate_model``), so replacing this callback in a config changes nothing else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

__all__ = ["BeforeAfterEval", "run_eval"]


def run_eval(
    pl_module: L.LightningModule, evalsets: Mapping[str, Any], batch_size: int = 64
) -> dict[str, float]:
    """Metrics of ``pl_module.eval_interface()`` on ``evalsets`` ({name: loaded eval set})."""
    from alignkit.evaluate import evaluate_model

    model, tokenizer, preprocess = pl_module.eval_interface()
    return evaluate_model(
        model, tokenizer, preprocess, evalsets, batch_size=batch_size, device=pl_module.device
    )


class BeforeAfterEval(Callback):
    """Args: ``evalsets`` {name: path of an eval set (CLIP_benchmark wds dir or CSV)}, ``batch_size``,
    ``filename`` (in the trainer's ``default_root_dir``). A resumed fit keeps the "before" numbers already in
    the file (the resumed model is not the starting one)."""

    def __init__(
        self, evalsets: Mapping[str, str], batch_size: int = 64, filename: str = "metrics.json"
    ) -> None:
        self.paths = dict(evalsets)
        self.batch_size, self.filename = batch_size, filename
        self.before: dict[str, float] | None = None
        self._sets: dict[str, Any] | None = None

    def _evalsets(self) -> dict[str, Any]:
        if self._sets is None:
            from alignkit.data.evalsets import load_eval_set

            self._sets = {name: load_eval_set(path, name) for name, path in self.paths.items()}
        return self._sets

    def _file(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        f = self._file(trainer)
        if trainer.ckpt_path and f.is_file():
            self.before = json.loads(f.read_text()).get("before")
        if self.before is None:
            self.before = run_eval(pl_module, self._evalsets(), self.batch_size)
            log.info("before training: %s", _short(self.before))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        after = run_eval(pl_module, self._evalsets(), self.batch_size)
        log.info("after training: %s", _short(after))
        before = self.before or {}
        result = {
            "step": trainer.global_step,
            "before": before,
            "after": after,
            "delta": {k: after[k] - before[k] for k in after if k in before},
        }
        if trainer.is_global_zero:
            self._file(trainer).parent.mkdir(parents=True, exist_ok=True)
            self._file(trainer).write_text(json.dumps(result, indent=1))
            for logger in trainer.loggers:
                logger.log_metrics({f"eval_after/{k}": v for k, v in after.items()}, step=trainer.global_step)


def _short(m: Mapping[str, float]) -> str:
    keys = [k for k in m if k.endswith(("/top1", "/i2t_r@1", "/t2i_r@1", "gap/", "/l2"))] or list(m)[:6]
    return ", ".join(f"{k}={m[k]:.3f}" for k in keys)
