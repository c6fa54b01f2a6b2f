"""Exports in open_clip's own hub layout: a directory that ``open_clip`` loads with no registration.

``DIR/open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), ``DIR/open_clip_model.safetensors`` and a model
card ``DIR/README.md``; a Hugging Face tokenizer's files sit next to them when the text tower needs one. This is
what ``open_clip.push_to_hf_hub`` uploads, so the same directory works as

* ``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``,
* ``clip_benchmark eval --model local-dir:DIR``, ``alignkit`` itself (``encoder.model=local-dir:DIR``),
* ``hf-hub:USER/REPO`` once the directory is uploaded (``huggingface-cli upload USER/REPO DIR``).

Nothing inside depends on where the directory lies: :func:`write_open_clip_dir` refuses absolute paths in the
config, so the directory can be copied or moved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "is_open_clip_dir",
    "model_card",
    "preprocess_cfg_of",
    "write_open_clip_dir",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"  # the names open_clip's local-dir / hf-hub loaders look for
WEIGHTS_NAME = "open_clip_model.safetensors"
CARD_NAME = "README.md"
# PreprocessCfg fields of open_clip (open_clip.transform.PreprocessCfg); other keys are dropped by its loader.
_PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


def is_open_clip_dir(path: str | Path) -> bool:
    """True for a directory in open_clip's hub layout (has ``open_clip_config.json``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def preprocess_cfg_of(model_or_cfg: Any) -> dict[str, Any]:
    """The eval-transform settings open_clip reads back: from a model (``model.visual.preprocess_cfg``) or a dict."""
    cfg = model_or_cfg
    if isinstance(model_or_cfg, torch.nn.Module):
        cfg = getattr(getattr(model_or_cfg, "visual", model_or_cfg), "preprocess_cfg", None) or {}
    out: dict[str, Any] = {}
    for k in _PREPROCESS_KEYS:
        v = cfg.get(k)
        if v is not None:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _absolute_paths(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in _absolute_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in _absolute_paths(v, f"{where}[{i}]")]
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")):
        return [f"{where}={obj!r}"]
    return []


def write_open_clip_dir(
    out_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    preprocess_cfg: Mapping[str, Any],
    card: str,
    extra_files: Iterable[str | Path] = (),
) -> Path:
    """Write one export directory; returns it.

    Args:
        state: the full open_clip state dict (``create_model(...).load_state_dict(state, strict=True)`` fits).
        model_cfg: the architecture as in open_clip's ``model_configs/*.json``.
        preprocess_cfg: eval transform settings (:func:`preprocess_cfg_of`).
        card: the model card text (``README.md``).
        extra_files: files copied in by name (e.g. a Hugging Face tokenizer's ``tokenizer.json``, ``vocab.txt``).
    """
    bad = _absolute_paths(model_cfg)
    if bad:
        raise ValueError(
            f"the open_clip config holds absolute paths ({', '.join(bad)}), so the export would not load on another "
            f"machine or after being moved; reference Hugging Face towers by hub id and ship their files instead."
        )
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in extra_files:
        shutil.copyfile(f, out / Path(f).name)
    # safetensors refuses tensors that share storage; independent contiguous copies load identically.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)  # atomic: a crash never leaves half a weights file under the final name
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg)}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD_NAME).write_text(card)
    log.info("exported %d tensors to %s (open_clip: local-dir:%s)", len(tensors), out, out)
    return out


def _metrics_table(history: Mapping[Any, Mapping[str, float]] | None) -> list[str]:
    if not history:
        return ["No evaluation was recorded for this run (set `evalsets=...` during training)."]
    steps = sorted(history, key=int)
    first, last = steps[0], steps[-1]
    keys = sorted(set(history[first]) | set(history[last]))
    lines = [f"| metric | step {first} | step {last} | change |", "|---|---:|---:|---:|"]
    for k in keys:
        a, b = history[first].get(k), history[last].get(k)
        change = f"{b - a:+.4f}" if a is not None and b is not None else ""
        fa = f"{a:.4f}" if a is not None else ""
        fb = f"{b:.4f}" if b is not None else ""
        lines.append(f"| `{k}` | {fa} | {fb} | {change} |")
    return lines


# The command a card prints, as README.md prints it (tests/test_clip_benchmark_cli.py runs both as printed):
# --no_amp keeps CLIP_benchmark in fp32 like alignkit's eval (it autocasts to bfloat16 on CPU by default) and
# --pretrained names the export in the result JSON (open_clip ignores it for local-dir:, default laion400m_e32).
CARD_DIR = "PATH/TO/THIS/DIR"
CLIP_BENCHMARK_COMMAND = (
    f"clip_benchmark eval --model local-dir:{CARD_DIR} --pretrained alignkit --dataset wds/fashion_mnist "
    "--dataset_root data/evalsets/fashion_mnist --task zeroshot_classification --no_amp --output result.json"
)


def model_card(
    title: str,
    *,
    base_model: str,
    data: str,
    recipe: Mapping[str, Any],
    history: Mapping[Any, Mapping[str, float]] | None = None,
    notes: str = "",
    base_model_ids: Iterable[str] = (),
    datasets: Iterable[str] = (),
    license: str = "other",
) -> str:
    """A Hugging Face model card (``huggingface_hub.ModelCard``): front matter (``library_name: open_clip``,
    ``license``, ``base_model`` hub ids, ``datasets``, ``pipeline_tag``), base model, data, recipe, before/after
    metrics, how to load and evaluate."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(
        library_name="open_clip",
        license=license,
        base_model=list(base_model_ids) or None,
        datasets=list(datasets) or None,
        pipeline_tag="zero-shot-image-classification",
        tags=["clip", "alignkit"],
    )
    lines = [
        f"# {title}",
        "",
        "Exported by alignkit in open_clip's hub layout.",
        "",
        f"* **Base model:** {base_model}",
        f"* **Training data:** {data}",
        "",
        "## Recipe",
        "",
        *[f"* `{k}`: {v}" for k, v in recipe.items()],
        "",
        "## Evaluation (first and last evaluation of the run)",
        "",
        *_metrics_table(history),
        "",
        "## Use",
        "",
        "```python",
        "import open_clip",
        f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{CARD_DIR}')",
        f"tokenizer = open_clip.get_tokenizer('local-dir:{CARD_DIR}')",
        "```",
        "",
        "After `huggingface-cli upload USER/REPO PATH/TO/THIS/DIR`, `hf-hub:USER/REPO` loads the same model.",
        "CLIP_benchmark, on a set from `scripts/build_evalsets.py fashion-mnist --out data/evalsets`:",
        "",
        "```bash",
        CLIP_BENCHMARK_COMMAND,
        "```",
        "",
    ]
    if notes:
        lines += ["## Notes", "", notes, ""]
    card = ModelCard(f"---\n{meta.to_yaml()}\n---\n" + "\n".join(lines))
    return str(card)


# What a model card lists from a run's resolved config (dotted keys; absent ones are skipped).
_RECIPE_KEYS = (
    "task_name",
    "loss._target_",
    "loss.weights",
    "optimizer._target_",
    "optimizer.lr",
    "optimizer.weight_decay",
    "scheduler._target_",
    "epochs",
    "data.batch_size",
    "seed",
)
_DATA_KEYS = ("_target_", "source", "train_shards", "csv_path", "pairs", "num_samples")


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _data_name(path: Any) -> str:
    p = Path(str(path))
    return p.parent.name if p.name in ("train", "shards", "pairs") and p.parent.name else p.name


def run_card(
    title: str,
    base_model: str,
    cfg: Mapping[str, Any] | None,
    history: Mapping[Any, Mapping[str, float]] | None,
    notes: str = "",
    steps: int | None = None,
    base_model_ids: Iterable[str] = (),
) -> str:
    """:func:`model_card` filled from a run's resolved config (``config.yaml``) and ``metrics.json`` history;
    ``steps``: the optimizer steps the run took (else the last evaluated step, when recorded)."""
    cfg = cfg or {}
    recipe = {k: v for k in _RECIPE_KEYS if (v := _get(cfg, k)) is not None}
    if steps is None and history:
        steps = max(int(k) for k in history)
    if steps is not None:
        recipe["steps trained"] = int(steps)
    data = cfg.get("data") if isinstance(cfg.get("data"), Mapping) else {}
    described = ", ".join(f"{k}={data[k]}" for k in _DATA_KEYS if data.get(k) is not None)
    datasets = sorted({_data_name(data[k]) for k in ("train_shards", "csv_path") if data.get(k)})
    return model_card(
        title,
        base_model=base_model,
        data=described or "not recorded",
        recipe=recipe or {"config": "not recorded"},
        history=history,
        notes=notes,
        base_model_ids=base_model_ids,
        datasets=datasets,
    )
