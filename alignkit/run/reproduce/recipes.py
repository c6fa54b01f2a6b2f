"""Paper-scale recipes: ``clip_refine_coco`` and ``structure_coco`` (GPU, pretrained weights, COCO, CLIP_benchmark).

Each recipe trains the released configuration through ``alignkit.run.train.train`` with the evaluation callback on
CLIP_benchmark webdataset eval sets before and after training, then prints (and writes to ``OUT/recipe.md`` /
``recipe.json``) our numbers beside the paper's. ``--dry-run`` runs the very same path on the shipped tiny models
and synthetic data (CPU, about a minute): only the encoder, the data and the sizes are swapped, so a recipe that
composes, trains, evaluates and reports here does the same with real weights.

Eval sets: ``--evalsets DIR`` holds one folder per CLIP_benchmark dataset in its webdataset layout, named as
CLIP_benchmark's ``wds_<name>`` repositories without the prefix (e.g. ``DIR/imagenet1k``, ``DIR/vtab-pets``,
``DIR/mscoco_captions``); folders that are missing are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from alignkit.core.configs import CONFIG_DIR
from alignkit.run.reproduce.rows import PAPER

log = logging.getLogger(__name__)

__all__ = ["RECIPES", "run_recipe", "tiny_text_tower"]

# (label, CLIP_benchmark folder) per recipe; the paper's 12 / 24 sets as far as CLIP_benchmark carries them.
RECIPES: dict[str, dict[str, Any]] = {
    "clip_refine_coco": {
        "runs": {"CLIP-Refine": ("clip_refine", ())},
        "baselines": {"Contrastive": ("clip_contrastive", ()), "Self-KD": ("self_kd", ())},
        "zeroshot": ["imagenet1k", "fgvc_aircraft", "cars", "vtab-caltech101", "vtab-dtd", "vtab-eurosat",
                     "vtab-flowers", "food101", "vtab-pets", "sun397", "cub", "ucf101"],
        "retrieval": ["mscoco_captions"],
        "paper": PAPER["clip_refine"],
    },
    "structure_coco": {
        "runs": {"Linear + Similar + R_S": ("structure", ()),
                 "Linear + Last": ("structure", ("data.selection.mode=last", "loss.align.use_structure=false"))},
        "baselines": {},
        "zeroshot": ["stl10", "cifar10", "cifar100", "imagenet1k"],
        "retrieval": ["flickr30k"],
        "paper": PAPER["structure"],
    },
}  # fmt: skip

_DRY = {
    "clip_refine_coco": ["encoder.model=alignkit-tiny-vit", "encoder.pretrained=null", "encoder.force_quick_gelu=false",
                         "data=synthetic", "data.num_samples=64", "data.batch_size=16"],
    "structure_coco": [
        "encoder=frozen_towers", "data.source=synthetic", "data.num_samples=96", "data.batch_size=16",
        "data.encode_batch_size=32", "data.selection.n_samples=64", "data.selection.k=5",
        "module.image_head.out_dim=16", "module.text_head.out_dim=16", "loss.align.warmup_steps=2", "epochs=2",
    ],
}  # fmt: skip
_COMMON_DRY = ["trainer=cpu", "callbacks.evaluation.batch_size=32"]


def tiny_text_tower(out: Path) -> str:
    """A 2-layer random BERT with all-MiniLM-L6-v2's tokenizer (the dry run's text tower), saved once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from alignkit.encoders.offline import minilm_path

    if not (out / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        )  # fmt: skip
        BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def _evalsets(recipe: dict, evalsets_dir: str | None, dry_run: bool) -> dict[str, dict]:
    if dry_run:
        base = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "evalsets" / "synthetic.yaml"))
        return dict(base)  # type: ignore[arg-type]
    if not evalsets_dir:
        raise ValueError("--evalsets DIR is needed (CLIP_benchmark webdataset eval sets; see --help)")
    nodes, missing = {}, []
    for name in [*recipe["zeroshot"], *recipe["retrieval"]]:
        path = Path(evalsets_dir) / name
        if path.is_dir():
            nodes[name] = {
                "_target_": "alignkit.data.evalsets.load_eval_set",
                "path": str(path),
                "name": name,
            }
        else:
            missing.append(name)
    if missing:
        log.warning("eval sets not found under %s (skipped): %s", evalsets_dir, missing)
    if not nodes:
        raise FileNotFoundError(f"none of the recipe's eval sets is under {evalsets_dir}: {missing}")
    return nodes


def _before_after(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    from alignkit.eval.report import METRICS_FILE, load_history

    hist = load_history(run_dir / METRICS_FILE)
    steps = sorted(hist)
    return hist[steps[0]], hist[steps[-1]]


def _pct(m: dict[str, float], key: str) -> str:
    """Accuracies and recalls in percent (the papers' unit); gaps as they are (×10³ for ‖·‖²/d)."""
    if key not in m:
        return "–"
    scale = 1e3 if key.endswith("sq_per_dim") else 1.0 if "/gap/" in key else 100.0
    return f"{scale * m[key]:.2f}"


def render(name: str, recipe: dict, measured: dict[str, dict[str, float]], dry_run: bool) -> str:
    """Markdown: every measured metric per run, then the paper's numbers for the same rows."""
    keys = sorted({k for m in measured.values() for k in m if "/zs/" in k or "_r@1" in k or "gap/" in k})
    keys = [k for k in keys if k.endswith(("top1", "_r@1", "/l2", "sq_per_dim"))]
    lines = [f"# {name}{' (DRY RUN: shipped tiny model, synthetic data; numbers are meaningless)' if dry_run else ''}",
             "", "| metric | " + " | ".join(measured) + " |", "|---|" + "---|" * len(measured)]  # fmt: skip
    for k in keys:
        lines.append(f"| `{k}` | " + " | ".join(_pct(m, k) for m in measured.values()) + " |")
    lines += ["", "Paper (percent; see README for the source):", ""]
    for table, vals in recipe["paper"].items():
        lines.append(f"* {table}: {json.dumps(vals)}")
    return "\n".join(lines) + "\n"


def run_recipe(
    name: str,
    out: str | Path,
    coco_shards: str | None,
    evalsets_dir: str | None,
    dry_run: bool = False,
    overrides: Sequence[str] = (),
    baselines: bool = False,
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run recipe ``name`` (module docstring) into ``out``; returns ``{run: {metric: value}}`` incl. "before"."""
    from alignkit.run.reproduce.runner import QUIET, train_run

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; one of {sorted(RECIPES)}")
    recipe, out = RECIPES[name], Path(out)
    if not dry_run and not coco_shards:
        raise ValueError(f"{name} needs --coco-shards DIR (COCO caption shards from `alignkit make-shards`)")
    nodes = _evalsets(recipe, evalsets_dir, dry_run)
    common = [*QUIET, "callbacks.evaluation.every_n_steps=0", "callbacks.evaluation.at_start=true"]
    if dry_run:
        common += [*_COMMON_DRY, *_DRY[name], f"paths.cache_dir={out / 'cache'}"]
    else:
        common.append(f"data.train_shards={coco_shards}")
    runs = dict(recipe["runs"]) | (dict(recipe["baselines"]) if baselines else {})
    measured: dict[str, dict[str, float]] = {}
    for label, (experiment, extra) in runs.items():
        run_dir = out / label.replace(" ", "_").replace("+", "").replace("__", "_")
        ov = [*common, *extra, *overrides]
        cfg_patch = None
        if dry_run and name == "structure_coco":
            cfg_patch = {"vision": {"kind": "timm", "model": "test_vit", "pretrained": False, "pool": "cls",
                                    "init_seed": 0},
                         "text": {"kind": "hf", "path": tiny_text_tower(out / "tiny_text")}, "context_length": 16}  # fmt: skip
            ov.append("data.train_shards=null")
        say(f"{name}: {label} (+experiment={experiment} {' '.join(ov)})")
        train_run(experiment, ov, run_dir, nodes, encoder_patch=cfg_patch)
        before, after = _before_after(run_dir)
        measured.setdefault("before training", before)
        measured[label] = after
    text = render(name, recipe, measured, dry_run)
    (out / "recipe.md").write_text(text)
    (out / "recipe.json").write_text(
        json.dumps({"recipe": name, "dry_run": dry_run, "measured": measured}, indent=1)
    )
    say(text)
    return measured
