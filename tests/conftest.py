"""Shared fixtures: offline environment, the shipped tiny CLIP, generated shards, composed configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from alignkit.run.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_train(
    overrides: list[str], run_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose configs/<config_name>.yaml like the CLI would, with the output directory set to ``run_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture
def tiny_encoder():
    from alignkit.encoders.openclip import OpenCLIPEncoder

    torch.manual_seed(0)
    return OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)


def synthetic_shards(out_dir: Path, n: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Write ``n`` learnable "a <colour> <shape>" pairs as webdataset shards (+ sizes.json)."""
    from alignkit.data.shards import write_shards
    from alignkit.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(transform=None, num_samples=n, image_size=32, seed=seed)
    return write_shards((ds.item(i) for i in range(n)), out_dir, samples_per_shard=per_shard, overwrite=True)
