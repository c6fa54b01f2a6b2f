"""The open_clip encoder node: a model (name + pretrained tag or local file) with its preprocess and tokenizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_shipped_configs() -> None:
    """Make the tiny architectures shipped in ``alignkit/model_configs`` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network and no local cache)."""


def _weights_help(model: str, pretrained: str) -> str:
    return (
        f"Could not obtain open_clip weights pretrained={pretrained!r} for model {model!r}: they are not in the local "
        f"cache and cannot be downloaded (no network, or HF_HUB_OFFLINE=1). Either\n"
        f"  * pass a local checkpoint file: encoder.pretrained=/path/to/open_clip_model.safetensors (any state dict "
        f"open_clip can load for {model}, e.g. one written by `alignkit export`), or\n"
        f'  * fetch the weights on a machine with internet (python -c "import open_clip; '
        f"open_clip.create_model('{model}', pretrained='{pretrained}')\") and copy the Hugging Face cache "
        f"(~/.cache/huggingface) here, or point encoder.cache_dir at it."
    )


def create_open_clip(model: str, pretrained: str | None = None, **options: Any) -> tuple[nn.Module, Any, Any]:
    """``open_clip.create_model_and_transforms`` with shipped configs registered and clear weight errors.

    Returns (model, train preprocess, eval preprocess). ``pretrained`` is a tag (``openai``, ``laion2b_s34b_b79k``),
    a local file, or None for random initialisation. ``options`` go to open_clip unchanged (``precision``,
    ``cache_dir``, ``force_quick_gelu``, ``image_mean``, ``image_std``, ...; open_clip's defaults otherwise).
    """
    register_shipped_configs()
    schema, location = open_clip.factory.parse_model_name(model)
    if schema == "local-dir":
        if not Path(location, "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"encoder.model={model!r}: {location} is not an open_clip export directory (no "
                f"open_clip_config.json); `alignkit export RUN OUT_DIR` writes one."
            )
    elif schema is None and model not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip architecture {model!r}. Known: e.g. ViT-B-32, ViT-B-16, RN50, "
            f"alignkit-tiny-vit (see open_clip.list_models()), an export directory as 'local-dir:/path/to/dir', or "
            f"'hf-hub:ORG/REPO'; add your own JSON with open_clip.add_model_config."
        )
    if schema is not None and pretrained:
        log.info(
            "encoder.model=%s carries its own weights; encoder.pretrained=%s is ignored", model, pretrained
        )
        pretrained = None
    is_path = pretrained is not None and (
        os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))
    )
    if is_path and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"encoder.pretrained={pretrained!r} looks like a file path but no such file exists"
        )
    if pretrained and not is_path and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise ValueError(
            f"pretrained tag {pretrained!r} is not known for {model!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(model)} (or pass a local file path)"
        )
    try:
        return open_clip.create_model_and_transforms(model, pretrained=pretrained, **options)
    except RuntimeError as e:
        if pretrained and not is_path and ("download" in str(e).lower() or "offline" in str(e).lower()):
            raise WeightsUnavailableError(_weights_help(model, pretrained)) from e
        raise


@dataclass
class OpenCLIPEncoder:
    """An open_clip model plus what the data pipeline needs from it.

    Args:
        model: open_clip architecture name (``ViT-B-32``, or a shipped tiny one like ``alignkit-tiny-vit``), an
            export directory ``local-dir:/path/to/dir`` or ``hf-hub:ORG/REPO``.
        pretrained: tag, local checkpoint file, or None (random init). Ignored (set it to null) when ``model`` is
            ``local-dir:DIR`` (an open_clip export directory, e.g. written by ``alignkit export``) or
            ``hf-hub:ORG/REPO``: those carry their own weights.
        lock_image / lock_text: freeze a tower; ``*_unlocked_groups`` / ``*_unlocked_layers`` keep its last N
            groups / layers trainable (open_clip's ``lock_image_tower`` / ``lock_text_tower``).
        grad_checkpointing: activation checkpointing in both towers (trades compute for memory).
        precision: open_clip load precision (keep ``fp32`` and use the trainer's mixed precision for training).
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    grad_checkpointing: bool = False
    precision: str = "fp32"
    cache_dir: str | None = None
    force_quick_gelu: bool = False
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    module: nn.Module = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if open_clip.factory.parse_model_name(self.model)[0] is not None:
            self.pretrained = (
                None  # a local-dir / hf-hub model holds its weights (recorded as such in the spec)
            )
        mean = tuple(self.image_mean) if self.image_mean is not None else None
        std = tuple(self.image_std) if self.image_std is not None else None
        self.module, self.preprocess_train, self.preprocess_val = create_open_clip(
            self.model,
            self.pretrained,
            precision=self.precision,
            cache_dir=self.cache_dir,
            force_quick_gelu=self.force_quick_gelu,
            image_mean=mean,
            image_std=std,
        )
        self.tokenizer = open_clip.get_tokenizer(self.model)
        if self.lock_image:
            self.module.lock_image_tower(
                unlocked_groups=self.lock_image_unlocked_groups, freeze_bn_stats=True
            )
        if self.lock_text:
            self.module.lock_text_tower(
                unlocked_layers=self.lock_text_unlocked_layers, freeze_layer_norm=True
            )
        if self.grad_checkpointing:
            self.module.set_grad_checkpointing(True)
        n_train = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.module.parameters())
        log.info(
            "open_clip %s (pretrained=%s): %.2fM params, %.2fM trainable",
            self.model,
            self.pretrained,
            n_all / 1e6,
            n_train / 1e6,
        )

    @property
    def spec(self) -> dict[str, Any]:
        """What export and eval need to rebuild the architecture with open_clip."""
        return {
            "kind": "open_clip",
            "model": self.model,
            "pretrained": self.pretrained,
            "force_quick_gelu": self.force_quick_gelu,
            # the eval transform's settings (mean/std/interpolation/resize mode): a pretrained tag can change
            # them, and a rebuild from the architecture name alone would silently use the defaults
            "preprocess": dict(getattr(self.module.visual, "preprocess_cfg", {}) or {}),
        }

    @staticmethod
    def encode(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw (unnormalised) embeddings and the exp'd logit scale of an open_clip model."""
        out = {
            "image_features": model.encode_image(images, normalize=False),
            "text_features": model.encode_text(tokens, normalize=False),
        }
        if getattr(model, "logit_scale", None) is not None:
            out["logit_scale"] = model.logit_scale.exp()
        return out


def open_clip_model_cfg(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip architecture config of an open_clip student (its spec: ``AlignkitSpec.model``)."""
    register_shipped_configs()
    name = spec.get("model")
    cfg = open_clip.get_model_config(name) if isinstance(name, str) else None
    if cfg is None:
        raise ValueError(
            f"cannot write an open_clip directory: the architecture {name!r} is unknown to open_clip (export to "
            f"OUT.safetensors instead and load it with your own config)."
        )
    if spec.get("force_quick_gelu"):
        cfg["quick_gelu"] = True  # the trained model used QuickGELU; a rebuild without it would differ
    return cfg


def save_hf_text_files(model_cfg: Mapping[str, Any], name: str, out: Path) -> None:
    """A Hugging Face text tower's config.json and tokenizer files into ``out`` (open_clip reads a local-dir's
    tokenizer from the directory itself)."""
    text = model_cfg.get("text_cfg") or {}
    if text.get("hf_model_name"):
        from transformers import AutoConfig

        AutoConfig.from_pretrained(text["hf_model_name"]).save_pretrained(out)
    if text.get("hf_tokenizer_name"):
        tok = open_clip.get_tokenizer(name)
        getattr(tok, "tokenizer", tok).save_pretrained(out)
