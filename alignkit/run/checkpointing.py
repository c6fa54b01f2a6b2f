"""The checkpoint contract: atomic writes, finding a run's checkpoint, reading it, and the resume guard.

* Writes: :func:`atomic_torch_save` / :class:`AtomicCheckpointIO` (temp file + fsync + rename).
* Finding: :func:`resolve_ckpt_path` (what training resumes: ``auto`` = last.ckpt or the newest intact step
  checkpoint / a path / nothing), :func:`resolve_checkpoint` (what export and eval read: a run dir or a file);
  :func:`checkpoint_problem`, :func:`clean_temp_parts`, :func:`prune_step_checkpoints` for interrupted runs.
* Reading: :func:`load_checkpoint` (CPU, safe loader first).
* Identity and guard: :class:`RunIdentity` writes :func:`run_identity` into every checkpoint under
  ``checkpoint["alignkit_run"]``; :func:`check_checkpoint_compatible` refuses a checkpoint from another architecture
  or experiment before Lightning would load it partially (or fail with a wall of missing keys). What a module
  stores about itself is under ``checkpoint["alignkit"]`` (:meth:`TrainingModule.checkpoint_spec`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a reader (or a job
    killed mid-write) sees the old complete file or the new complete file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O for local paths with temp-file + rename semantics (remote URLs: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None


STEP_FILE = re.compile(r"^(?P<prefix>.*?)(?P<step>\d+)(?:-v(?P<version>\d+))?\.ckpt$")


def clean_temp_parts(folder: str | Path, older_than: float) -> list[Path]:
    """Remove the temp parts (``.<name>.*.tmp``) an interrupted atomic write left in ``folder``, if they are older
    than ``older_than`` (a ``time.time()``: the start of this attempt, so no write of this run is touched)."""
    removed = []
    for p in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        try:
            if p.is_file() and p.stat().st_mtime < older_than:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d temp part(s) of interrupted writes in %s", len(removed), folder)
    return removed


def step_checkpoints(folder: str | Path, prefix: str) -> list[tuple[int, int, Path]]:
    """(step, version, path) of the ``<prefix><digits>[-vN].ckpt`` files in ``folder``, oldest first."""
    found = []
    for p in Path(folder).glob(f"{prefix}*.ckpt") if prefix and Path(folder).is_dir() else []:
        m = STEP_FILE.match(p.name)
        if m and m["prefix"] == prefix:
            found.append((int(m["step"]), int(m["version"] or 0), p))
    return sorted(found)


def prune_step_checkpoints(folder: str | Path, prefix: str, keep: int, current_step: int) -> list[Path]:
    """Keep the ``keep`` newest step checkpoints at or before ``current_step``; remove the others, and any of a
    later step (left by an attempt that got further before it was killed: this run writes those steps again).

    Lightning's own ``save_top_k`` bookkeeping lives in the checkpoint it resumed from, so files written after that
    checkpoint by a killed attempt were never removed (~700 MB instead of ~81 MB after 18 kills)."""
    files = step_checkpoints(folder, prefix)
    later = [p for step, _, p in files if step > current_step]
    earlier = [p for step, _, p in files if step <= current_step]
    doomed = later + (earlier[:-keep] if keep > 0 else [])
    for p in doomed:
        p.unlink(missing_ok=True)
    if doomed:
        log.info(
            "removed %d step checkpoint(s) beyond save_top_k=%d: %s",
            len(doomed),
            keep,
            [p.name for p in doomed],
        )
    return doomed


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a usable Lightning checkpoint (empty, truncated, not a checkpoint), or None if intact.

    Reads the archive's index and small objects only (``mmap``): no tensor data is loaded."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return "empty file (0 bytes)"
        ckpt = torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning checkpoint (no state_dict / global_step)"
    return None


def resolve_ckpt_path(
    ckpt_path: str | None, run_dir: str | Path, ckpt_dir: str | Path | None = None, step_prefix: str = "step"
) -> str | None:
    """``auto`` → ``<ckpt_dir>/last.ckpt`` when it exists and is intact, else the newest intact step checkpoint
    (logged), else start fresh; an explicit path must exist and be intact. ``ckpt_dir`` defaults to
    ``<run_dir>/checkpoints``."""
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "auto":
        folder = Path(ckpt_dir) if ckpt_dir else Path(run_dir) / "checkpoints"
        candidates = [folder / "last.ckpt"] + [p for *_, p in reversed(step_checkpoints(folder, step_prefix))]
        for c in (c for c in candidates if c.is_file()):
            problem = checkpoint_problem(c)
            if problem is None:
                (log.info if c.name == "last.ckpt" else log.warning)("resuming from %s", c)
                return str(c)
            log.error("checkpoint %s is corrupt: %s; trying the next newest", c, problem)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist (use ckpt_path=auto to resume the run directory)"
        )
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is a corrupt checkpoint: {problem}. Give another checkpoint, or "
            f"ckpt_path=auto to resume from the newest intact one of the run directory"
        )
    return str(ckpt_path)


def resolve_checkpoint(src: str | Path) -> Path:
    """A ``.ckpt`` file as it is, or ``<run dir>/checkpoints/last.ckpt`` for a run directory."""
    p = Path(src)
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{p} is a directory but {ckpt} does not exist; pass the .ckpt file itself."
            )
        return ckpt
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found.")
    return p


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` on CPU; safe loader first, full unpickling only for our own Lightning checkpoints."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning stores hyper_parameters (often OmegaConf objects) that the safe loader refuses.
        # Exporting is done on one's own checkpoints; never export a file from an untrusted source.
        log.info("%s holds non-tensor objects; loading with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


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
    saved_enc = (ckpt.get("alignkit") or {}).get("encoder")
    enc = getattr(getattr(module, "encoder", None), "spec", None)
    if saved_enc and enc:
        for k in ("kind", "model", "pretrained"):
            if saved_enc.get(k) != enc.get(k):
                problems.append(f"encoder {k}: checkpoint {saved_enc.get(k)!r} vs this run {enc.get(k)!r}")
    saved_run = ckpt.get("alignkit_run")
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
        checkpoint["alignkit_run"] = dict(self.identity)
