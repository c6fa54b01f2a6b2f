"""Export a trained alignkit model for open_clip.

``alignkit export RUN_DIR_OR_CKPT OUT_DIR`` writes open_clip's hub layout (:mod:`alignkit.core.hub`):
``open_clip.create_model_and_transforms("local-dir:OUT_DIR")`` and ``clip_benchmark eval --model local-dir:OUT_DIR``
load it with no registration, from anywhere, after a move. ``OUT.safetensors`` / ``OUT.pt`` instead writes only the
student's plain open_clip state dict (no Lightning ``model.`` or teacher prefixes), for
``open_clip.create_model_and_transforms(ARCH, pretrained=OUT)``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from alignkit.core.checkpoint import (
    extract_state_dict,
    find_architecture,
    load_checkpoint,
    read_alignkit_spec,
    resolve_checkpoint,
    run_dir_of,
    student_spec,
)
from alignkit.modules.workflows import workflow_of

__all__ = [
    "EXPORT_DIR",
    "export_checkpoint",
    "export_module",
    "extract_state_dict",
    "find_architecture",
    "main",
    "write_state_dict",
]

log = logging.getLogger(__name__)

EXPORT_DIR = "open_clip"  # <run dir>/open_clip: every run's export
FILE_SUFFIXES = (
    ".safetensors",
    ".pt",
    ".bin",
    ".pth",
)  # a plain state dict file; anything else is a directory


def write_state_dict(
    state: Mapping[str, torch.Tensor], out_path: str | Path, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write ``state`` atomically (``.safetensors`` with safetensors, else ``torch.save``); with ``meta``, also
    ``OUT.json`` next to it. The one writer behind :func:`export_checkpoint` and :func:`export_module`."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage; independent contiguous copies are loaded identically.
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(tmp))
    else:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    tmp.replace(out)  # atomic: a crash never leaves a half-written export under the final name
    if meta is not None:
        out.with_suffix(".json").write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")
        if meta.get("architecture") is None:
            log.info("export: no architecture name in the checkpoint; pass the right --model to open_clip")
    return out


def _meta(source: str, ckpt: Mapping[str, Any], n: int) -> dict[str, Any]:
    spec = student_spec(ckpt)
    meta: dict[str, Any] = {"source": source, "architecture": find_architecture(ckpt), "num_tensors": n}
    for key in ("pretrained", "force_quick_gelu", "preprocess"):
        if key in spec:
            meta[key] = spec[key]
    return meta


def _read_run(run_dir: Path | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(resolved config, metrics history) a run directory recorded, when present."""
    if run_dir is None:
        return None, None
    cfg = hist = None
    if (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    if (run_dir / "metrics.json").is_file():
        hist = json.loads((run_dir / "metrics.json").read_text())
    return cfg, hist


def _write_dir(
    ckpt: Mapping[str, Any],
    out_dir: str | Path,
    prefix: str,
    run_cfg: Mapping | None,
    history: Mapping | None,
) -> Path:
    """One open_clip directory from a checkpoint dict, written by the workflow the checkpoint records."""
    saved = read_alignkit_spec(ckpt)
    spec = dict(saved.model) if saved is not None else {}
    return workflow_of(saved).write_open_clip(ckpt, spec, out_dir, prefix, run_cfg, history)


def export_module(
    module: torch.nn.Module,
    out_path: str | Path,
    prefix: str = "model.",
    sidecar: bool = True,
    run_cfg: Mapping[str, Any] | None = None,
    history: Mapping[Any, Mapping[str, float]] | None = None,
) -> Path:
    """Export a training module in memory (e.g. at the end of ``train()``), exactly as its checkpoint would be.

    Builds the same dict ``on_save_checkpoint`` gives a checkpoint (state dict without the teacher, plus
    the ``alignkit`` section). ``out_path`` is an open_clip directory (model card from ``run_cfg`` and the
    ``history`` of evaluations) or, with a ``.safetensors``/``.pt`` suffix, a plain state dict file.
    """
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        ckpt["global_step"] = trainer.global_step
    hook = getattr(module, "on_save_checkpoint", None)
    if callable(hook):
        hook(ckpt)
    if Path(out_path).suffix not in FILE_SUFFIXES:
        return _write_dir(ckpt, out_path, prefix, run_cfg, history)
    state = extract_state_dict(ckpt, prefix)
    source = f"in-memory {type(module).__name__}"
    out = write_state_dict(state, out_path, _meta(source, ckpt, len(state)) if sidecar else None)
    log.info("exported %d tensors to %s", len(state), out)
    return out


def export_checkpoint(
    src: str | Path, out_path: str | Path, prefix: str = "model.", sidecar: bool = True
) -> Path:
    """Export a ``.ckpt`` (or ``<run>/checkpoints/last.ckpt``); returns the output path.

    ``out_path`` without a state-dict suffix: an open_clip hub-layout directory, with a model card from the run's
    ``config.yaml`` and ``metrics.json`` when the checkpoint lies in a run directory. ``.safetensors`` (safetensors)
    or ``.pt``/``.bin`` (``torch.save``): the student's plain state dict; with ``sidecar``, ``OUT.json`` next to
    it records the source and the architecture when the checkpoint names it.
    """
    ckpt_path = resolve_checkpoint(src)
    ckpt = load_checkpoint(ckpt_path)
    if Path(out_path).suffix not in FILE_SUFFIXES:
        return _write_dir(ckpt, out_path, prefix, *_read_run(run_dir_of(ckpt_path)))
    state = extract_state_dict(ckpt, prefix)
    out = write_state_dict(state, out_path, _meta(str(ckpt_path), ckpt, len(state)) if sidecar else None)
    log.info("exported %d tensors from %s to %s", len(state), ckpt_path, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a Lightning .ckpt or a run directory (uses checkpoints/last.ckpt)")
    parser.add_argument(
        "out",
        help="output directory (open_clip hub layout: load with open_clip 'local-dir:OUT'), or a file "
        "OUT.safetensors / OUT.pt for the plain state dict",
    )
    parser.add_argument("--prefix", default="model.", help="state_dict prefix of the student model")
    parser.add_argument("--no-sidecar", action="store_true", help="state-dict files: do not write OUT.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_checkpoint(args.src, args.out, args.prefix, sidecar=not args.no_sidecar)


if __name__ == "__main__":
    main()
