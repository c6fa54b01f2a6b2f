"""Logger factories that need more than a constructor call."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

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
