"""The run-level checkpoint contract: what a checkpoint must share with the run that resumes it
(:func:`run_identity`, written by :class:`RunIdentity` under ``checkpoint["alignkit_run"]``) and the resume guard
(:func:`check_checkpoint_compatible` refuses a checkpoint from another architecture or experiment before Lightning
would load it partially). Files, loading and the ``checkpoint["alignkit"]`` schema: :mod:`alignkit.core.checkpoint`;
what a resume picks: :mod:`alignkit.run.resume`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from alignkit.core.checkpoint import RUN_SECTION, read_alignkit_spec, read_run_section, run_section
from alignkit.modules.workflows import workflow_of

log = logging.getLogger(__name__)


# Encoder options that change neither the weights' meaning nor the computation; every other one (model,
# pretrained, force_quick_gelu, image_mean, locked groups, tower specs, ...) must match on resume.
ENCODER_OPTIONS_FREE_ON_RESUME = ("cache_dir", "grad_checkpointing")


def encoder_identity(encoder_cfg: DictConfig | dict) -> dict[str, Any]:
    """The encoder config (resolved, plain values) minus the options that may change on resume."""
    plain = (
        OmegaConf.to_container(encoder_cfg, resolve=True)
        if isinstance(encoder_cfg, DictConfig)
        else encoder_cfg
    )
    return {k: v for k, v in dict(plain).items() if k not in ENCODER_OPTIONS_FREE_ON_RESUME}


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (stored under ``checkpoint["alignkit_run"]``)."""
    return {
        "task_name": str(cfg.get("task_name", "")),
        "encoder": encoder_identity(cfg.encoder),
        "loss": str(cfg.loss.get("_target_", "")),
    }


def check_checkpoint_compatible(ckpt_path: str | Path, module: torch.nn.Module, cfg: DictConfig) -> None:
    """Refuse (ValueError naming the difference) a checkpoint from another architecture or experiment."""
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False, mmap=True)
    problems = []
    saved = read_alignkit_spec(ckpt, str(ckpt_path))
    workflow = getattr(module, "workflow", None)
    if saved is not None and workflow and saved.workflow != workflow:
        problems.append(f"workflow: checkpoint {saved.workflow!r} vs this run {workflow!r}")
    elif saved is not None:
        problems += workflow_of(saved).resume_problems(saved.model, module)
    saved_run = read_run_section(ckpt, str(ckpt_path))
    if saved_run:
        now = run_identity(cfg)
        for k in ("task_name", "loss"):
            if saved_run.get(k) != now.get(k):
                problems.append(f"{k}: checkpoint {saved_run.get(k)!r} vs this run {now.get(k)!r}")
        # only the options the checkpoint recorded (older checkpoints hold model and pretrained)
        saved_opts, now_opts = saved_run.get("encoder") or {}, now["encoder"]
        for k in sorted(k for k in saved_opts if k not in ENCODER_OPTIONS_FREE_ON_RESUME):
            if saved_opts.get(k) != now_opts.get(k):
                problems.append(
                    f"encoder.{k}: checkpoint {saved_opts.get(k)!r} vs this run {now_opts.get(k)!r}"
                )
    sd = ckpt.get("state_dict", {})
    # Weights a module deliberately leaves out of its checkpoints (a frozen teacher, frozen towers) are rebuilt
    # from their source on load, so they are neither missing nor unexpected.
    skip = tuple(getattr(module, "non_checkpointed_prefixes", ()))
    mine = {k: v.shape for k, v in module.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(mine) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(mine) if not k.startswith(skip))
    shapes = sorted(k for k in set(mine) & set(sd) if tuple(sd[k].shape) != tuple(mine[k]))
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} weight(s), e.g. {keys[:3]}")
    if problems:
        raise ValueError(
            f"refusing to resume from {ckpt_path}: it belongs to another model or experiment:\n  "
            + "\n  ".join(problems)
            + "\nStart a new run directory, or set ckpt_path=null (start fresh) / ckpt_path=<a matching checkpoint>"
        )


class RunIdentity(Callback):
    """Writes :func:`run_identity` into every checkpoint (read back by :func:`check_checkpoint_compatible`)."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = dict(identity)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_SECTION] = run_section(self.identity)
