"""Logger factories that need more than a constructor call."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(
    save_dir: str,
    project: str = "alignkit",
    name: str | None = None,
    offline: bool = False,
    tags: list[str] | None = None,
    group: str | None = None,
) -> WandbLogger:
    """A WandbLogger whose run id is stored in ``<save_dir>/wandb_id``: a resumed or requeued job continues the same
    wandb run instead of starting a new one. ``WANDB_MODE=offline`` or ``offline=true`` needs no network."""
    path = Path(save_dir)
    path.mkdir(parents=True, exist_ok=True)
    id_file = path / "wandb_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # 8 lowercase hex chars: a valid wandb run id
        # Only the global rank 0 logs to wandb, and only it writes the id: several ranks racing to write here would
        # leave another rank's id for the requeued job, which would then start a new wandb run.
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            id_file.write_text(run_id)
    offline = offline or os.environ.get("WANDB_MODE") == "offline"
    return WandbLogger(
        project=project,
        name=name,
        save_dir=str(path),
        offline=offline,
        id=run_id,
        resume="allow",
        tags=list(tags or []),
        group=group,
    )


def flat_hparams(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved run config as ``{"optimizer.lr": 0.001, ...}``: one level of dotted keys, which wandb and
    TensorBoard both list, filter and compare by (nested dicts would become ``optimizer/lr`` in TensorBoard)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_hparams(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def log_run_config(loggers: Sequence[Any], hparams: Mapping[str, Any]) -> None:
    """The flat config into each logger before training: wandb's config, the CSV logger's hparams.yaml.

    TensorBoard keeps only the *first* hparams record of a run (its SummaryWriter drops later ones with the same
    tag), and that record must already name the metrics to show beside the config; so TensorBoard gets its hparams
    record once, at the end, with the final metrics (:func:`log_final_metrics`). Its hparams.yaml is written now."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.hparams.update(hparams)  # written to hparams.yaml by the logger's save()
        else:
            lg.log_hyperparams(dict(hparams))


def log_final_metrics(
    loggers: Sequence[Any], hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int
) -> None:
    """The end-of-training evaluation into the wandb run summary and TensorBoard's hparams view (rank 0)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    final = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
    for lg in loggers:
        if isinstance(lg, WandbLogger) and final:
            lg.experiment.summary.update(final)
        elif isinstance(lg, TensorBoardLogger) and final:
            _tensorboard_hparams_record(lg, hparams, final, step)


def _tensorboard_hparams_record(
    lg: Any, hparams: Mapping[str, Any], final: Mapping[str, float], step: int
) -> None:
    """The hparams-plugin record alone. ``TensorBoardLogger.log_hyperparams(params, metrics)`` also logs
    ``metrics`` as scalars, which the evaluation callback has already logged at this step: every final ``val/*``
    point would show twice. TensorBoard's hparams view reads the metric values from those scalars by tag, so the
    record needs only the names (torch.utils.tensorboard's ``hparams`` summary, as Lightning itself writes it)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    plain = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()}
    # SummaryWriter's public FileWriter (None once the writer was closed: then a FileWriter of its own on the same
    # directory, closed here)
    writer = lg.experiment.file_writer
    own = writer is None
    if own:
        from torch.utils.tensorboard.writer import FileWriter

        writer = FileWriter(lg.experiment.get_logdir())
    for summary in hparams_summary(plain, dict(final)):
        writer.add_summary(summary, step)
    if own:
        writer.close()


def logger_locations(loggers: Sequence[Any]) -> dict[str, str]:
    """Where each logger wrote (for summary.json and the report): wandb run id/dir, TensorBoard/CSV log dirs."""
    out: dict[str, str] = {}
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            out["wandb"] = f"run {run.id} in {run.dir} (offline runs: `wandb sync {Path(run.dir).parent}`)"
        elif getattr(lg, "log_dir", None):
            out[type(lg).__name__] = str(lg.log_dir)
    return out


def link_loggers_in_report(report: Path, locations: Mapping[str, str]) -> None:
    """Append where the loggers wrote to the run's ``report.md`` (when the evaluation callback wrote one)."""
    if not report.is_file() or not locations:
        return
    lines = ["", "## Loggers", "", *[f"* **{name}:** {where}" for name, where in locations.items()], ""]
    report.write_text(report.read_text().rstrip("\n") + "\n" + "\n".join(lines))
