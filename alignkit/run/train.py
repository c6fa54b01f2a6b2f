"""Training entry: compose → instantiate → fit → export. ``python train.py +experiment=NAME [overrides]``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from alignkit.callbacks.nonfinite import NonFiniteError
from alignkit.core.checkpoint import clean_temp_parts
from alignkit.core.config_tree import print_config_tree
from alignkit.core.configs import CONFIG_DIR
from alignkit.eval.report import METRICS_FILE, REPORT_FILE, load_history
from alignkit.run.build import ExportsItself, build_run
from alignkit.run.checkpointing import check_checkpoint_compatible
from alignkit.run.export import EXPORT_DIR, export_module
from alignkit.run.loggers import (
    flat_hparams,
    link_loggers_in_report,
    log_final_metrics,
    log_run_config,
    logger_locations,
)
from alignkit.run.preflight import preflight
from alignkit.run.resume import RunDirLock, resolve_ckpt_path

log = logging.getLogger(__name__)


def finish_loggers(trainer: L.Trainer) -> None:
    """Close wandb runs so their files are complete (and a later run in the same process starts a new segment)."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb  # present: a WandbLogger exists

            if (
                wandb.run is not None
            ):  # the logger's run, if it started one (WandbLogger.experiment would start it)
                wandb.run.finish()


@rank_zero_only
def save_run_files(cfg: DictConfig, run_dir: Path, summary: dict[str, Any] | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def check_finite_weights(module: torch.nn.Module) -> None:
    """Refuse to export a model with NaN / infinite weights (a run with ``callbacks.nonfinite`` removed)."""
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(
            f"refusing to export: {len(bad)} weight tensor(s) are not finite, e.g. {bad[:3]}"
        )


def exit_code(summary: dict[str, Any]) -> int:
    """0 for a finished run (or one handed to a requeue); 128 + signal number for a run a signal stopped that
    nobody requeues (the shell's convention for "ended by a signal")."""
    if not summary.get("interrupted") or summary.get("requeued"):
        return 0
    name = summary.get("interrupted_by") or "SIGTERM"
    return 128 + int(getattr(signal, name, signal.SIGTERM))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed config; returns a summary (final metrics, paths)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Settings and writable directories first: a bad value fails in seconds, before any data or model is loaded.
    started = time.time()
    preflight(cfg)
    run_dir = Path(cfg.paths.output_dir)
    # One run per run directory, held by global rank 0 for the whole run (released on any exit, kill -9 included).
    lock = RunDirLock(run_dir).acquire() if rank_zero_only.rank == 0 else None
    try:
        return _train(cfg, run_dir, started)
    except Exception as err:  # failed: the cause in summary.json, then the error propagates (non-zero exit)
        save_run_files(
            cfg, run_dir, {"run_dir": str(run_dir), "failed": True, "error": f"{type(err).__name__}: {err}"}
        )
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, started: float) -> dict[str, Any]:
    ckpt_cfg = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    ckpt_dir = Path(ckpt_cfg.get("dirpath") or run_dir / "checkpoints")
    if (
        rank_zero_only.rank == 0
    ):  # parts of writes a killed attempt left (never this attempt's: older than start)
        for folder in (ckpt_dir, run_dir):
            clean_temp_parts(folder, older_than=started)
    # What to resume, before any data or model: all-corrupt checkpoints stop the run here (ckpt_path=fresh: rank 0
    # moves them aside, the other ranks start fresh with it).
    step_prefix = str(ckpt_cfg.get("filename") or "").split("{")[0]
    wanted = cfg.get("ckpt_path")
    fresh_elsewhere = wanted == "fresh" and rank_zero_only.rank != 0
    ckpt = None if fresh_elsewhere else resolve_ckpt_path(wanted, run_dir, ckpt_dir, step_prefix)
    L.seed_everything(cfg.seed, workers=True)

    # Data first (a missing path fails before any model is built), then encoder, module, trainer and batch plan.
    run = build_run(cfg)
    module, trainer = run.module, run.trainer
    save_run_files(cfg, run_dir)
    if ckpt is not None:
        check_checkpoint_compatible(ckpt, module, cfg)
    status = run.status  # what the callbacks report (preempted, signal, requeued, skipped steps, hand-over)
    status.defer_handover = True  # submitit's requeue handler exits: call it after the summary is written
    # The resolved config as flat hyperparameters (optimizer.lr, ...): in the checkpoints' hyper_parameters, the
    # wandb config and hparams.yaml now, TensorBoard's hparams view with the final metrics at the end.
    hparams = flat_hparams(OmegaConf.to_container(cfg, resolve=True))
    module.save_hyperparameters(hparams, logger=False)
    if trainer.is_global_zero:
        log_run_config(trainer.loggers, hparams)
    trainer.fit(module, datamodule=run.data, ckpt_path=ckpt)
    preempted = status.preempted

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "resumed_from": ckpt,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "preempted": preempted,
        # interrupted: stopped by a signal before the end; requeued: the scheduler will run it again. An
        # interrupted run that nobody requeues exits non-zero (main) so a wrapper knows it did not finish.
        "interrupted": preempted,
        "interrupted_by": status.interrupted_by,
        "requeued": status.requeued,
        "nonfinite_skipped_steps": status.skipped_steps,
    }
    if trainer.is_global_zero and trainer.loggers:
        log_final_metrics(trainer.loggers, hparams, summary["metrics"], trainer.global_step)
        summary["loggers"] = logger_locations(trainer.loggers)
        link_loggers_in_report(run_dir / REPORT_FILE, summary["loggers"])
    finish_loggers(trainer)
    if preempted:  # last.ckpt is written; the requeued job resumes it (no export of a half-trained model)
        save_run_files(cfg, run_dir, summary)
        status.hand_over()  # submitit path: requeue and exit here
        return summary
    if cfg.get("export") and trainer.is_global_zero:
        check_finite_weights(module)
        # Every run exports <run dir>/open_clip in open_clip's hub layout (open_clip 'local-dir:'), with a model
        # card from this config and the evaluation history; frozen-tower modules also keep their own format.
        run_cfg = OmegaConf.to_container(cfg, resolve=True)
        history = load_history(run_dir / METRICS_FILE)
        summary["exported"] = (
            module.export_to(run_dir, run_cfg=run_cfg, history=history)
            if isinstance(module, ExportsItself)
            else str(export_module(module, run_dir / EXPORT_DIR, run_cfg=run_cfg, history=history))
        )
    save_run_files(cfg, run_dir, summary)
    return summary


def objective(cfg: DictConfig, summary: dict[str, Any]) -> float | None:
    """``cfg.optimized_metric`` from the run's final metrics (what a sweeper such as Optuna maximises)."""
    name = cfg.get("optimized_metric")
    if not name or summary.get("preempted"):
        return None
    metrics = summary["metrics"]
    if name not in metrics:
        raise ValueError(
            f"optimized_metric={name!r} was not logged by this run; its final metrics are {sorted(metrics)}. "
            f"Pick one of those (evaluation metrics need evalsets=[...])."
        )
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    print_config_tree(cfg)
    summary = train(cfg)
    code = exit_code(summary)
    if code:
        log.error(
            "run interrupted before the end (last.ckpt written; resume with ckpt_path=auto): exit %d", code
        )
        sys.exit(code)
    return objective(cfg, summary)


if __name__ == "__main__":
    main()
