"""Export a trained alignkit checkpoint to a plain open_clip state dict.

``python -m alignkit.run.export RUN_DIR_OR_CKPT OUT.safetensors`` writes the student model's weights with no
Lightning (``model.``) or teacher prefixes, so ``open_clip.create_model_and_transforms(ARCH,
pretrained=OUT)`` and CLIP_benchmark (``--model ARCH --pretrained OUT``) load it as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "export_checkpoint",
    "export_module",
    "extract_state_dict",
    "find_architecture",
    "load_checkpoint",
    "main",
    "resolve_checkpoint",
    "write_state_dict",
]

log = logging.getLogger(__name__)

ARCH_KEYS = ("model_name", "arch", "architecture")


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
    """open_clip architecture name from ``ckpt["alignkit"]`` or ``ckpt["hyper_parameters"]``, if recorded."""
    spec = _encoder_spec(ckpt)
    if spec.get("kind") == "open_clip" and isinstance(spec.get("model"), str):
        return spec["model"]  # what AlignModule.on_save_checkpoint records
    for section in ("alignkit", "hyper_parameters"):
        value = ckpt.get(section)
        if value is not None:
            try:
                from omegaconf import OmegaConf

                if OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value, resolve=False)
            except ImportError:
                pass
            found = _search(value)
            if found:
                return found
    return None


def _encoder_spec(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    section = ckpt.get("alignkit")
    spec = section.get("encoder") if isinstance(section, Mapping) else None
    return dict(spec) if isinstance(spec, Mapping) else {}


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
    spec = _encoder_spec(ckpt)
    meta: dict[str, Any] = {"source": source, "architecture": find_architecture(ckpt), "num_tensors": n}
    for key in ("pretrained", "force_quick_gelu", "preprocess"):
        if key in spec:
            meta[key] = spec[key]
    return meta


def export_module(
    module: torch.nn.Module, out_path: str | Path, prefix: str = "model.", sidecar: bool = True
) -> Path:
    """Export a training module in memory (e.g. at the end of ``train()``), exactly as its checkpoint would be.

    Builds the same dict ``on_save_checkpoint`` gives a checkpoint (state dict without the teacher, plus
    the ``alignkit`` section) and goes through :func:`extract_state_dict` and :func:`write_state_dict`.
    """
    ckpt: dict[str, Any] = {"state_dict": module.state_dict()}
    hook = getattr(module, "on_save_checkpoint", None)
    if callable(hook):
        hook(ckpt)
    state = extract_state_dict(ckpt, prefix)
    source = f"in-memory {type(module).__name__}"
    out = write_state_dict(state, out_path, _meta(source, ckpt, len(state)) if sidecar else None)
    log.info("exported %d tensors to %s", len(state), out)
    return out


def export_checkpoint(
    src: str | Path, out_path: str | Path, prefix: str = "model.", sidecar: bool = True
) -> Path:
    """Write the student's open_clip state dict from a ``.ckpt`` (or ``<run>/checkpoints/last.ckpt``).

    ``.safetensors`` output uses safetensors, anything else ``torch.save``. With ``sidecar``, a JSON next
    to the output (``OUT.json``) records the source and the architecture when the checkpoint names it.
    Returns the output path.
    """
    ckpt_path = resolve_checkpoint(src)
    ckpt = load_checkpoint(ckpt_path)
    state = extract_state_dict(ckpt, prefix)
    out = write_state_dict(state, out_path, _meta(str(ckpt_path), ckpt, len(state)) if sidecar else None)
    log.info("exported %d tensors from %s to %s", len(state), ckpt_path, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a Lightning .ckpt or a run directory (uses checkpoints/last.ckpt)")
    parser.add_argument("out", help="output file: .safetensors, or .pt/.bin for torch.save")
    parser.add_argument("--prefix", default="model.", help="state_dict prefix of the student model")
    parser.add_argument("--no-sidecar", action="store_true", help="do not write OUT.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_checkpoint(args.src, args.out, args.prefix, sidecar=not args.no_sidecar)


if __name__ == "__main__":
    main()
