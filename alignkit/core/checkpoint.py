"""Checkpoint files and what they say: atomic writes, finding a run's checkpoint, loading, the
``checkpoint["alignkit"]`` schema and the student's state dict / architecture. Every reader and writer of
checkpoint files goes through this module; the run-level contract on top (resume resolution, run identity, the
resume guard) is :mod:`alignkit.run.checkpointing` and :mod:`alignkit.run.resume`.

* Writes: :func:`atomic_torch_save` / :class:`AtomicCheckpointIO` (temp file + fsync + rename).
* Finding: :func:`resolve_checkpoint` (what export and eval read: a run dir's newest intact checkpoint, or a file),
  :func:`run_dir_of`; :func:`checkpoint_problem`, :func:`newest_intact_checkpoint`, :func:`clean_temp_parts`,
  :func:`prune_step_checkpoints` for interrupted runs.
* Reading: :func:`load_checkpoint` (CPU, safe loader first), :func:`extract_state_dict`, :func:`find_architecture`.
* The model's spec: ``checkpoint["alignkit"]`` is :meth:`AlignkitSpec.section` (schema 1: workflow, what rebuilds
  the model for eval / export, teacher), written by the training modules' ``on_save_checkpoint`` and read only
  through :func:`read_alignkit_spec`, which also reads the two unversioned layouts of older checkpoints.
* The run's two other sections carry the same schema number: ``checkpoint["alignkit_run"]`` (the run identity the
  resume guard compares: :func:`run_section` / :func:`read_run_section`) and ``checkpoint["alignkit_rng"]`` (every
  rank's RNG states: :func:`rng_section` / :func:`read_rng_section`). Their unversioned layouts (before schema 1)
  are still read; any other schema is refused, naming the fix.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


# What a checkpoint must hold: Lightning needs both to resume; export and eval need the weights only.
RESUMABLE, WEIGHTS = ("state_dict", "global_step"), ("state_dict",)


def checkpoint_problem(path: str | Path, needs: tuple[str, ...] = RESUMABLE) -> str | None:
    """Why ``path`` is not a usable checkpoint (empty, truncated, without the entries ``needs``), or None if intact.

    Reads the archive's index and small objects only (``mmap``): no tensor data is loaded."""
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            return "empty file (0 bytes)"
        ckpt = torch.load(str(p), map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:
        return f"unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needs):
        return f"not a Lightning checkpoint (no {' / '.join(needs)})"
    return None


LAST = "last.ckpt"
DEFAULT_STEP_PREFIX = "step"  # configs/callbacks/default.yaml: filename step{step:07d}


def newest_intact_checkpoint(
    folder: str | Path, step_prefix: str = DEFAULT_STEP_PREFIX, needs: tuple[str, ...] = RESUMABLE
) -> Path | None:
    """``<folder>/last.ckpt`` when it is intact, else the newest intact ``<step_prefix>*.ckpt`` (logged), else None.

    A corrupt candidate is logged and skipped: a job killed while writing must not block its own resume."""
    folder = Path(folder)
    candidates = [folder / LAST] + [p for *_, p in reversed(step_checkpoints(folder, step_prefix))]
    for c in (c for c in candidates if c.is_file()):
        problem = checkpoint_problem(c, needs)
        if problem is None:
            if c.name != LAST:
                log.warning("%s is missing or corrupt: using the newest intact step checkpoint %s", LAST, c)
            return c
        log.error("checkpoint %s is corrupt: %s; trying the next newest", c, problem)
    return None


def resolve_checkpoint(src: str | Path) -> Path:
    """What export and eval read: a ``.ckpt`` file as it is; for a run directory, the checkpoint a resume would
    take (``checkpoints/last.ckpt``, or the newest intact ``step*.ckpt`` when last.ckpt is missing or corrupt)."""
    p = Path(src)
    if p.is_dir():
        folder = p / "checkpoints"
        found = newest_intact_checkpoint(folder, needs=WEIGHTS)
        if found is None:
            last = folder / LAST
            state = (
                f"is corrupt ({checkpoint_problem(last, WEIGHTS)})" if last.is_file() else "does not exist"
            )
            raise FileNotFoundError(
                f"{p} is a directory but {last} {state} and {folder} holds no intact {DEFAULT_STEP_PREFIX}*.ckpt; "
                "pass the .ckpt file itself."
            )
        return found
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found.")
    return p


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """The run directory a checkpoint lies in (``<run dir>/checkpoints/<name>.ckpt``), else None."""
    p = Path(ckpt_path)
    return p.parent.parent if p.parent.name == "checkpoints" else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` on CPU; safe loader first, full unpickling only for our own Lightning checkpoints."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning stores hyper_parameters (often OmegaConf objects) that the safe loader refuses.
        # Exporting is done on one's own checkpoints; never export a file from an untrusted source.
        log.info("%s holds non-tensor objects; loading with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


# ----- checkpoint["alignkit"]: what the checkpoint holds and what rebuilds it -----
SCHEMA_VERSION = 1
WORKFLOWS = ("clip_refine", "structure")
# The family of alignkit.encoders.aligned.FORMAT: older STRUCTURE checkpoints stored the aligned model's spec bare.
FROZEN_TOWERS_FORMAT = "alignkit-frozen-towers/"


@dataclass(frozen=True)
class AlignkitSpec:
    """``checkpoint["alignkit"]`` as read by :func:`read_alignkit_spec` (written by :meth:`section`).

    * ``workflow``: ``clip_refine`` — an open_clip student (whatever the loss); ``model`` is its
      :attr:`~alignkit.encoders.openclip.OpenCLIPEncoder.spec` (kind, model, pretrained, force_quick_gelu,
      preprocess), which eval.py and export rebuild with open_clip. ``structure`` — frozen towers + trained heads;
      ``model`` is :meth:`~alignkit.encoders.aligned.AlignedDualEncoder.spec` (format, tower specs, layers, head
      classes, temperature), the same dict as an export's ``model.json``.
    * ``teacher``: the run distilled from a frozen copy of its starting model (never stored: rebuilt on load).
    * ``schema``: the layout the checkpoint was written in: 1, or 0 for the unversioned layouts before it.
    """

    workflow: str
    model: dict[str, Any] = field(default_factory=dict)
    teacher: bool = False
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.workflow not in WORKFLOWS:
            raise ValueError(f"workflow {self.workflow!r} is not one of {', '.join(WORKFLOWS)}")

    def section(self) -> dict[str, Any]:
        """The dict written under ``checkpoint["alignkit"]`` (plain values: loadable with weights_only=True)."""
        return {
            "schema": SCHEMA_VERSION,
            "workflow": self.workflow,
            "model": dict(self.model),
            "teacher": bool(self.teacher),
        }


_SCHEMA_FIX = (
    "Read it with the alignkit version that wrote it (and export it there: alignkit export), or pass the "
    "architecture yourself (eval.py model.name=ARCH; export to OUT.safetensors)."
)


def _check_schema(section: Mapping[str, Any], key: str, source: str, fix: str = _SCHEMA_FIX) -> None:
    if "schema" in section and section["schema"] != SCHEMA_VERSION:
        raise ValueError(
            f"{source}: checkpoint[{key!r}] has schema {section['schema']!r}; this alignkit reads schema "
            f"{SCHEMA_VERSION} and the unversioned layouts before it. {fix}"
        )


RUN_SECTION, RNG_SECTION = "alignkit_run", "alignkit_rng"
_RESUME_FIX = "Resume it with the alignkit version that wrote it, or start fresh (ckpt_path=null)."


def run_section(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``checkpoint["alignkit_run"]``: the run identity (task, encoder options, loss) under the schema number."""
    return {"schema": SCHEMA_VERSION, **identity}


def read_run_section(ckpt: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any] | None:
    """The run identity a checkpoint recorded (schema 1 or the unversioned dict before it); None if none."""
    section = ckpt.get(RUN_SECTION)
    if not section:
        return None
    if not isinstance(section, Mapping):
        raise ValueError(
            f"{source}: checkpoint[{RUN_SECTION!r}] is a {type(section).__name__}, not a dict. {_RESUME_FIX}"
        )
    _check_schema(section, RUN_SECTION, source, _RESUME_FIX)
    return {k: v for k, v in section.items() if k != "schema"}


def rng_section(states: list[Any]) -> dict[str, Any]:
    """``checkpoint["alignkit_rng"]``: one RNG state per rank, in rank order, under the schema number."""
    return {"schema": SCHEMA_VERSION, "ranks": list(states)}


def read_rng_section(ckpt: Mapping[str, Any], source: str = "the checkpoint") -> list[Any] | None:
    """Every rank's RNG states (schema 1, or the bare list written before it); None if the checkpoint has none."""
    section = ckpt.get(RNG_SECTION)
    if section is None:
        return None
    if isinstance(section, list):  # unversioned, before schema 1
        return section
    if isinstance(section, Mapping) and isinstance(section.get("ranks"), list):
        _check_schema(section, RNG_SECTION, source, _RESUME_FIX)
        return list(section["ranks"])
    raise ValueError(
        f"{source}: checkpoint[{RNG_SECTION!r}] is neither a list of per-rank states nor a dict with 'ranks'. "
        f"{_RESUME_FIX}"
    )


def read_alignkit_spec(ckpt: Mapping[str, Any], source: str = "the checkpoint") -> AlignkitSpec | None:
    """The one reader of ``checkpoint["alignkit"]``: schema 1, and the two unversioned layouts older checkpoints
    carry (CLIP-Refine's ``{"encoder": <spec>, "has_teacher": bool}``, STRUCTURE's bare aligned-model spec with
    ``"format": "alignkit-frozen-towers/1"``). None when there is no such section (a Lightning checkpoint no alignkit
    training module wrote). Anything else: ``ValueError`` naming the problem and the fix."""
    section = ckpt.get("alignkit")
    if section is None or (isinstance(section, Mapping) and not section):
        return None
    fix = _SCHEMA_FIX
    if not isinstance(section, Mapping):
        raise ValueError(f"{source}: checkpoint['alignkit'] is a {type(section).__name__}, not a dict. {fix}")
    if "schema" in section:
        _check_schema(section, "alignkit", source)
        workflow, model = section.get("workflow"), section.get("model")
        if workflow not in WORKFLOWS or not isinstance(model, Mapping):
            raise ValueError(
                f"{source}: checkpoint['alignkit'] (schema {SCHEMA_VERSION}) needs a workflow in {WORKFLOWS} and a "
                f"model dict; it has workflow={workflow!r}, model of type {type(model).__name__}. {fix}"
            )
        return AlignkitSpec(workflow, dict(model), bool(section.get("teacher", False)))
    if str(section.get("format", "")).startswith(FROZEN_TOWERS_FORMAT):  # STRUCTURE before schema 1
        return AlignkitSpec("structure", dict(section), False, schema=0)
    if isinstance(section.get("encoder"), Mapping):  # CLIP-Refine before schema 1
        return AlignkitSpec(
            "clip_refine", dict(section["encoder"]), bool(section.get("has_teacher", False)), schema=0
        )
    raise ValueError(
        f"{source}: checkpoint['alignkit'] has no schema and is neither older layout (a CLIP-Refine 'encoder' "
        f"dict, a STRUCTURE '{FROZEN_TOWERS_FORMAT}*' format); keys: {sorted(map(str, section))[:8]}. {fix}"
    )


# ----- the student inside a checkpoint -----
ARCH_KEYS = ("model_name", "arch", "architecture")


def extract_state_dict(ckpt: Mapping[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed; everything else (teacher, loss buffers) is dropped.

    A ``_orig_mod.`` left by ``torch.compile`` right after the prefix is removed too.
    """
    state = ckpt.get("state_dict", ckpt)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not k.startswith(prefix) or not isinstance(v, torch.Tensor):
            continue
        key = k[len(prefix) :]
        key = key.removeprefix("_orig_mod.")
        out[key] = v
    if not out:
        sample = list(state)[:5]
        raise KeyError(f"no tensors under prefix '{prefix}' in the checkpoint (first keys: {sample}).")
    dropped = len(state) - len(out)
    if dropped:
        log.info("export: kept %d tensors under '%s', dropped %d others", len(out), prefix, dropped)
    return out


def _search(obj: Any, depth: int = 0) -> str | None:
    if depth > 6:
        return None
    if isinstance(obj, Mapping):
        for k in ARCH_KEYS:
            if isinstance(obj.get(k), str):
                return obj[k]
        for v in obj.values():
            found = _search(v, depth + 1)
            if found:
                return found
    return None


def find_architecture(ckpt: Mapping[str, Any]) -> str | None:
    """open_clip architecture name of the student: from ``ckpt["alignkit"]`` (:func:`read_alignkit_spec`), else
    searched in ``ckpt["hyper_parameters"]`` (a checkpoint no alignkit module wrote), if recorded."""
    spec = student_spec(ckpt)
    if spec.get("kind") == "open_clip" and isinstance(spec.get("model"), str):
        return spec["model"]
    value = ckpt.get("hyper_parameters")
    if value is not None:
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=False)
        except ImportError:
            pass
        return _search(value)
    return None


def student_spec(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The model spec ``checkpoint["alignkit"]`` records ({} when none). An open_clip student's says
    ``kind: open_clip`` with its ``model`` / ``pretrained`` / ``preprocess``; a frozen-towers model's has none of
    those keys, so the readers below find nothing open_clip in it."""
    saved = read_alignkit_spec(ckpt)
    return dict(saved.model) if saved is not None else {}
