"""Standalone evaluation: ``python eval.py model.ckpt=RUN_OR_CKPT evalsets=[...]`` or
``python eval.py model.name=ARCH model.pretrained=TAG_OR_FILE evalsets=[...]``.

Writes the same ``metrics.json`` / ``report.md`` / ``embeddings.png`` as the training callback into its
output directory, with the same metric names (``val/zs/<set>/top1`` ...), so the numbers can be compared
key by key with a training run's.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import open_clip
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from alignkit.core.checkpoint import load_checkpoint, read_alignkit_spec, resolve_checkpoint
from alignkit.core.config_tree import print_config_tree
from alignkit.core.configs import CONFIG_DIR  # one config tree for train.py and eval.py
from alignkit.core.hub import is_open_clip_dir
from alignkit.encoders.aligned import load_aligned
from alignkit.encoders.openclip import WeightsUnavailableError, create_open_clip
from alignkit.eval.recorder import EvalRecorder
from alignkit.eval.report import METRICS_FILE
from alignkit.modules.workflows import workflow_of

__all__ = ["LoadedModel", "evaluate", "load_model", "main"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What evaluation needs: an open_clip-style model, its tokenizer and eval preprocess, and a label."""

    model: nn.Module
    tokenizer: Any
    preprocess: Any
    step: int
    description: str


def _from_checkpoint(src: str, name: str | None, precision: str) -> LoadedModel:
    if Path(src, "model.json").is_file() and not Path(src, "checkpoints").is_dir():
        model, tokenizer, preprocess = load_aligned(src)  # an export directory of a frozen-encoder run
        layers = f"layers {model.image_layer}/{model.text_layer}"
        return LoadedModel(model, tokenizer, preprocess, 0, f"frozen towers + heads ({layers}) from {src}")
    if is_open_clip_dir(src):  # an open_clip hub-layout export (alignkit export / <run>/open_clip)
        if name:
            raise ValueError(
                f"{src} is an open_clip export directory; it names its architecture (drop model.name)"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{src}", precision=precision)
        return LoadedModel(
            model, open_clip.get_tokenizer(f"local-dir:{src}"), preprocess, 0, f"local-dir:{src}"
        )
    path = resolve_checkpoint(src)
    ckpt = load_checkpoint(path)
    saved = read_alignkit_spec(ckpt, str(path))
    step = int(ckpt.get("global_step", 0))
    spec = dict(saved.model) if saved is not None else {}
    rebuilt = workflow_of(saved).rebuild(ckpt, spec, str(path), name, precision)
    return LoadedModel(
        rebuilt.model, rebuilt.tokenizer, rebuilt.preprocess, step, f"{rebuilt.description} (step {step})"
    )


def load_model(
    ckpt: str | None = None,
    name: str | None = None,
    pretrained: str | None = None,
    precision: str = "fp32",
    force_quick_gelu: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """A training run's model (``ckpt``: run directory or ``.ckpt``; ``name`` overrides the recorded open_clip
    architecture; a frozen-encoder run's towers are rebuilt from their specs, as is an ``alignkit`` export
    directory with ``model.json``) or an open_clip model (``name`` + ``pretrained`` tag / local file / None)."""
    if ckpt:
        if pretrained:
            raise ValueError("pass either model.ckpt or model.pretrained, not both")
        return _from_checkpoint(str(ckpt), name, precision)
    if not name:
        raise ValueError(
            "nothing to evaluate: pass model.ckpt=RUN_DIR_OR_CKPT, or model.name=ARCH "
            "[model.pretrained=TAG_OR_FILE]"
        )
    try:
        model, _, preprocess = create_open_clip(
            name, pretrained, precision=precision, cache_dir=cache_dir, force_quick_gelu=force_quick_gelu
        )
    except WeightsUnavailableError as e:
        # The encoder's message, with the option spelled as eval.py names it.
        raise WeightsUnavailableError(
            f"{e}\n(In eval.py the same options are model.pretrained=... and model.cache_dir=...)"
        ) from e
    return LoadedModel(
        model, open_clip.get_tokenizer(name), preprocess, 0, f"{name} (pretrained={pretrained})"
    )


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the model, evaluate every selected set, write metrics.json / report.md / embeddings.png."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    autocast = cfg.get("autocast")
    if autocast not in (None, "bf16", "fp16"):
        raise ValueError(f"autocast={autocast!r} is not one of null, bf16, fp16")
    recorder = EvalRecorder(cfg.evalsets, batch_size=cfg.batch_size, plot_set=cfg.get("plot_set"))
    if not recorder.evalsets:
        raise ValueError("no eval sets selected: pass e.g. evalsets=[synthetic] or evalsets=offline")
    m = cfg.model
    loaded = load_model(m.ckpt, m.name, m.pretrained, m.precision, m.force_quick_gelu, m.cache_dir)
    device = _device(cfg.device)
    loaded.model.to(device)
    metrics = recorder.evaluate(
        loaded.model, loaded.tokenizer, loaded.preprocess, loaded.step, device=device, precision=autocast
    )
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorder.save_history(out)
    assert recorder.last is not None  # the plot set is always kept
    report = recorder.write_report(
        out, {"model": loaded.description}, panels={loaded.description: recorder.last[1]}
    )
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("%s", metrics_table(metrics, f"{loaded.description} (step {loaded.step})"))
    log.info("wrote %s and %s", out / METRICS_FILE, report)
    return {"output_dir": str(out), "step": loaded.step, "metrics": metrics}


def metrics_table(metrics: dict[str, float], title: str) -> str:
    """The metrics written to metrics.json as an aligned two-column table, for the console."""
    width = max((len(k) for k in metrics), default=6)
    rows = [f"{k:<{width}}  {float(v):.4f}" for k, v in sorted(metrics.items())]
    return "\n".join([title, f"{'metric':<{width}}  value", "-" * (width + 10), *rows])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    print_config_tree(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
