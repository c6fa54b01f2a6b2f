"""The trained frozen-encoder model: tower tap at the selected layer → head, with open_clip's encode interface.

Export formats:

* **alignkit** (always): ``model.safetensors`` holds only the heads (and ``logit_scale``); ``model.json`` holds
  the tower specs, the layers and the head classes. :func:`load_aligned` rebuilds the towers from their sources
  (hub / local files / offline packages) and loads the heads — the frozen weights are never stored twice.
* **open_clip** (when both heads are linear, sit on the towers' final outputs, the vision tower is timm and the
  text tower Hugging Face, and the text head has no bias — open_clip's HF projection is bias-free): a
  ``CustomTextCLIP`` config + full state dict that ``open_clip.create_model_and_transforms`` loads as it is.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.core.hub import run_card, write_open_clip_dir
from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.encoders.heads import LinearHead
from alignkit.encoders.hub_cache import ensure_in_hub_cache, text_tower_hub_id

log = logging.getLogger(__name__)

__all__ = ["AlignedDualEncoder", "export_open_clip", "head_spec", "load_aligned", "save_aligned"]

FORMAT = "alignkit-frozen-towers/1"
TOWERS_PREFIX = "towers."
_HEAD_MODULE = "alignkit.encoders.heads"


def head_spec(factory: Any) -> dict[str, Any]:
    """``{"target", "kwargs"}`` of a head factory (a ``functools.partial`` of a head class)."""
    if isinstance(factory, partial):
        func, kwargs = factory.func, dict(factory.keywords)
    else:
        func, kwargs = factory, {}
    return {"target": f"{func.__module__}.{func.__qualname__}", "kwargs": _jsonable(kwargs)}


def build_head(spec: Mapping[str, Any], in_dim: int) -> nn.Module:
    """Rebuild a head from :func:`head_spec`; only classes of ``alignkit.encoders.heads`` are accepted (a spec
    file must never be able to import arbitrary code)."""
    module, _, name = str(spec["target"]).rpartition(".")
    if module != _HEAD_MODULE:
        raise ValueError(f"head target {spec['target']!r} is not a class of {_HEAD_MODULE}")
    cls = getattr(importlib.import_module(module), name)
    return cls(in_dim=in_dim, **dict(spec.get("kwargs") or {}))


class AlignedDualEncoder(nn.Module):
    """``encode_image(images)`` = image head(vision tower layer ``image_layer``), same for text; open_clip-style
    (``normalize=False`` by default, ``logit_scale`` = log(1/τ) as a buffer)."""

    def __init__(
        self,
        towers: FrozenTowers,
        image_layer: int,
        text_layer: int,
        image_head: nn.Module,
        text_head: nn.Module,
        temperature: float = 0.05,
        head_specs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.towers, self.image_layer, self.text_layer = towers, int(image_layer), int(text_layer)
        self.image_head = image_head
        self.text_head = text_head
        self.temperature = float(temperature)
        self.head_specs = dict(head_specs or {})
        self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)))

    def image_inputs(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.towers.image_layers(images, [self.image_layer])[self.image_layer]

    def text_inputs(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            return self.towers.text_layers(tokens, [self.text_layer])[self.text_layer]

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        z = self.image_head(self.image_inputs(images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        z = self.text_head(self.text_inputs(tokens))
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        return {
            "image_features": self.encode_image(images, normalize=True),
            "text_features": self.encode_text(tokens, normalize=True),
            "logit_scale": self.logit_scale.exp(),
        }

    def trained_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen towers (they are reloaded from their source)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TOWERS_PREFIX)}

    def spec(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "towers": self.towers.spec,
            "image_layer": self.image_layer,
            "text_layer": self.text_layer,
            "image_layer_name": self.towers.vision.layer_names[self.image_layer],
            "text_layer_name": self.towers.text.layer_names[self.text_layer],
            "image_in_dim": _in_dim(self.image_head),
            "text_in_dim": _in_dim(self.text_head),
            "image_head": self.head_specs.get("image"),
            "text_head": self.head_specs.get("text"),
            "temperature": self.temperature,
        }


def _in_dim(head: nn.Module) -> int:
    first = next(m for m in head.modules() if isinstance(m, nn.Linear))
    return first.in_features


def _jsonable(obj: Any) -> Any:
    from alignkit.encoders.frozen_towers import _plain

    return json.loads(json.dumps(_plain(obj), default=str))


def save_aligned(model: AlignedDualEncoder, out_dir: str | Path) -> Path:
    """Write the alignkit format (``model.safetensors`` + ``model.json``) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trained_state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps(model.spec(), indent=1))
    return out / "model.json"


def load_aligned(path: str | Path, towers: FrozenTowers | None = None) -> tuple[AlignedDualEncoder, Any, Any]:
    """(model, tokenizer, eval preprocess) from an alignkit export directory (or its ``model.json``).

    The towers are rebuilt from the recorded specs unless ``towers`` is given (reuse already loaded ones)."""
    from safetensors.torch import load_file

    p = Path(path)
    spec_file = p / "model.json" if p.is_dir() else p
    spec = json.loads(spec_file.read_text())
    heads = load_file(str(spec_file.parent / "model.safetensors"))
    return aligned_from_spec(spec, heads, towers, source=str(spec_file.parent))


def aligned_from_spec(
    spec: dict[str, Any],
    heads: dict[str, Tensor],
    towers: FrozenTowers | None = None,
    source: str = "",
) -> tuple[AlignedDualEncoder, Any, Any]:
    """(model, tokenizer, eval preprocess) from a spec (``model.json``, or a training checkpoint's model spec:
    ``alignkit.core.checkpoint.read_alignkit_spec(ckpt).model``) and the trained weights (heads and logit scale,
    no tower weights)."""
    if spec.get("format") != FORMAT:
        raise ValueError(f"{source}: format {spec.get('format')!r} is not {FORMAT!r}")
    if towers is None:
        t = spec["towers"]
        towers = FrozenTowers(
            t["vision"], t["text"], t.get("image_size"), t.get("crop_pct"), t.get("context_length")
        )
    model = AlignedDualEncoder(
        towers,
        spec["image_layer"],
        spec["text_layer"],
        build_head(spec["image_head"], spec["image_in_dim"]),
        build_head(spec["text_head"], spec["text_in_dim"]),
        spec["temperature"],
        {"image": spec["image_head"], "text": spec["text_head"]},
    )
    missing, unexpected = model.load_state_dict(heads, strict=False)
    bad = [k for k in missing if not k.startswith(TOWERS_PREFIX)]
    if bad or unexpected:
        raise ValueError(f"{source}: head weights do not fit (missing {bad}, unexpected {unexpected})")
    return model.eval(), towers.tokenizer, towers.preprocess_val


def open_clip_blocker(model: AlignedDualEncoder) -> str | None:
    """Why this model cannot be written as an open_clip ``CustomTextCLIP`` (None when it can)."""
    t = model.towers
    if model.image_layer != t.vision.num_layers - 1 or model.text_layer != t.text.num_layers - 1:
        return "the heads do not sit on the towers' final outputs"
    if not (isinstance(model.image_head, LinearHead) and isinstance(model.text_head, LinearHead)):
        return "a head is not linear"
    if model.text_head.proj.bias is not None:
        return "the text head has a bias (open_clip's Hugging Face projection has none; train with ++module.text_head.bias=false)"
    if model.image_head.proj.out_features != model.text_head.proj.out_features:
        return "the heads have different output sizes"
    if t.vision_spec.get("kind") not in ("timm", "effnet_lite0_offline"):
        return f"vision tower kind {t.vision_spec.get('kind')!r} has no open_clip equivalent"
    if t.vision_spec.get("model_kwargs"):
        return "open_clip's timm config cannot pass encoder.vision.model_kwargs"
    if t.vision_spec.get("kind") == "timm" and t.vision.is_vit and t.vision.pool != "cls":
        return "ViT average pooling is not mapped to open_clip's timm pooling here"
    return None


def open_clip_config(model: AlignedDualEncoder) -> tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]:
    """(model_cfg, preprocess_cfg, state dict) of the ``CustomTextCLIP`` equal to ``model``.

    The timm trunk's own classifier (``num_classes = embed_dim``, with bias) carries the image head and the HF
    tower's linear projection the text head. The text tower is named by hub id (:func:`text_tower_hub_id`): open_clip
    resolves a path in ``hf_model_name`` against the current directory, so a path would not survive a move.
    Raises ``ValueError`` with the reason when the model has no open_clip equivalent.
    """
    reason = open_clip_blocker(model)
    if reason:
        raise ValueError(f"no open_clip export: {reason}")
    t = model.towers
    timm_model = t.vision.model
    embed = model.image_head.proj.out_features
    vspec = t.vision_spec
    timm_name = "tf_efficientnet_lite0" if vspec.get("kind") == "effnet_lite0_offline" else vspec["model"]
    pool = "token" if t.vision.pool == "cls" else "avg"
    size = t.data_cfg["input_size"][1]
    hub_id, _ = text_tower_hub_id(t.text_spec)
    cfg = {
        "embed_dim": embed,
        "init_logit_scale": float(model.logit_scale),
        "vision_cfg": {
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": pool,
            "timm_proj": "",  # the trunk's classifier (with bias) is the projection
            "image_size": size,
        },
        "text_cfg": {
            "hf_model_name": hub_id,
            "hf_tokenizer_name": hub_id,
            "hf_model_pretrained": False,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": t.context_length,
        },
    }
    sd: dict[str, Tensor] = {}
    classifier = timm_model.default_cfg.get("classifier", "classifier")
    for k, v in timm_model.state_dict().items():
        if not k.startswith(classifier + "."):
            sd[f"visual.trunk.{k}"] = v
    sd[f"visual.trunk.{classifier}.weight"] = model.image_head.proj.weight
    sd[f"visual.trunk.{classifier}.bias"] = (
        model.image_head.proj.bias if model.image_head.proj.bias is not None else torch.zeros(embed)
    )
    for k, v in t.text.model.state_dict().items():
        # open_clip builds its HF transformer without the BERT pooler (mean pooling does not use it).
        if not k.startswith("pooler."):
            sd[f"text.transformer.{k}"] = v
    sd["text.proj.weight"] = model.text_head.proj.weight
    sd["logit_scale"] = model.logit_scale.reshape(())
    interp = t.data_cfg.get("interpolation")
    pre = {"size": size, "mean": list(t.data_cfg["mean"]), "std": list(t.data_cfg["std"])}
    if interp in ("bicubic", "bilinear"):
        pre["interpolation"] = interp
    return cfg, pre, sd


def export_open_clip(model: AlignedDualEncoder, out_dir: str | Path, card: str | None = None) -> Path:
    """Write ``model`` as an open_clip hub-layout directory (:mod:`alignkit.core.hub`); returns the directory.

    ``open_clip.create_model_and_transforms("local-dir:" + out_dir)`` loads it with no registration, from any
    directory and after a move. The text tower's ``config.json`` and tokenizer files travel with the export; when
    the tower was loaded from local files they are also put into the local Hugging Face cache under the tower's
    hub id (:func:`alignkit.encoders.hub_cache.ensure_in_hub_cache`), which is how open_clip finds its config.
    """

    cfg, pre, sd = open_clip_config(model)
    crop = float(model.towers.data_cfg.get("crop_pct") or 1.0)
    if crop < 1.0:
        # open_clip's eval transform resizes the short side straight to the input size; timm's first resizes to
        # size / crop_pct, then crops: the same image reaches the two models slightly differently framed.
        log.warning(
            "open_clip export: open_clip's eval transform has no crop_pct; alignkit's timm transform used "
            "crop_pct=%.3f, so open_clip-preprocessed images are framed slightly wider than in training",
            crop,
        )
    t = model.towers
    hub_id, source = text_tower_hub_id(t.text_spec)
    if card is None:
        card = structure_card(model.spec(), None, None)
    out = write_open_clip_dir(out_dir, sd, cfg, pre, card)
    before = set(os.listdir(out))
    t.text.model.config.save_pretrained(out)  # config.json: what open_clip's AutoConfig needs
    t.text.tokenizer.save_pretrained(out)  # local-dir: open_clip's get_tokenizer reads the directory itself
    shipped = sorted(set(os.listdir(out)) - before | {"config.json"})
    if source is not None:
        weights = [source / "model.safetensors"] if (source / "model.safetensors").is_file() else []
        ensure_in_hub_cache(hub_id, [out / f for f in shipped if (out / f).is_file()] + weights)
    return out


def _vision_name(v: Mapping[str, Any]) -> str:
    return (
        "tf_efficientnet_lite0"
        if v.get("kind") == "effnet_lite0_offline"
        else str(v.get("model", v.get("kind")))
    )


def structure_card(
    spec: Mapping[str, Any],
    run_cfg: Mapping[str, Any] | None,
    history: Mapping[Any, Mapping[str, float]] | None,
    steps: int | None = None,
) -> str:
    """The model card of a STRUCTURE export (``spec``: ``AlignedDualEncoder.spec()``, as a checkpoint records it);
    the one card text for exports at the end of training and from a checkpoint."""
    towers = spec.get("towers") or {}
    vision, text = towers.get("vision") or {}, towers.get("text") or {}
    text_id, _ = text_tower_hub_id(text)
    vision_name = _vision_name(vision)
    ids = [f"timm/{vision_name}" if "/" not in vision_name else vision_name, text_id]
    base = f"vision tower {vision_name} (timm), text tower {text_id} (Hugging Face); both frozen, linear heads trained"
    return run_card(
        "STRUCTURE-aligned frozen encoders", base, run_cfg, history, steps=steps, base_model_ids=ids
    )
