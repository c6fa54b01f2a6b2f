"""Every experiment builds: its data node, module (with its loss, optimizer and schedule) and trainer instantiate.

The experiments' own encoders (OpenAI ViT-B/32, DINOv2 + RoBERTa, the offline EfficientNet + MiniLM) need weights
that are not all available offline, so each workflow's encoder is swapped for a tiny stand-in of the same kind: the
shipped tiny open_clip model, or two random frozen towers. Everything else is the experiment's own configuration.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_VISION, compose_train, synthetic_shards
from omegaconf import open_dict

from alignkit.core.configs import CONFIG_DIR
from alignkit.run.build import build_run

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pairs")
    synthetic_shards(out, n=16, per_shard=8)
    return str(out)


def build_experiment(name: str, tmp_path: Path, shards: str, text_dir: str):
    cfg = compose_train([f"+experiment={name}", f"paths.cache_dir={tmp_path}/cache"], tmp_path / "run")
    frozen = cfg.encoder._target_.endswith("FrozenTowers")
    with open_dict(cfg):
        if cfg.data.get("source") == "webdataset":  # "in" is False for a ??? value: ask the source kind
            cfg.data.train_shards = shards
        if cfg.data.get("prepare") is not None:
            # the offline demo builds its pairs and eval sets on first use: stand-in shards and synthetic eval sets
            cfg.data.prepare = None
            cfg.evalsets = compose_train(["+experiment=smoke"]).evalsets
        if frozen:
            cfg.encoder.vision = dict(TINY_VISION)
            cfg.encoder.text = {"kind": "hf", "path": text_dir}
            cfg.encoder.image_size, cfg.encoder.crop_pct, cfg.encoder.context_length = None, None, 16
        else:
            cfg.encoder.model, cfg.encoder.pretrained = "alignkit-tiny-vit", None
    # Every node instantiated as train() builds it; no data read (prepare=False: no features, no batch plan).
    run = build_run(cfg, prepare=False)
    data, module, trainer = run.data, run.module, run.trainer
    return cfg, data, module, trainer


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_data_module_and_trainer(name, tmp_path, shards, tiny_text_dir):
    from alignkit.data import ImageTextDataModule
    from alignkit.data.features import FeaturePairDataModule
    from alignkit.modules.clip_refine import AlignModule
    from alignkit.modules.structure import StructureModule

    cfg, data, module, trainer = build_experiment(name, tmp_path, shards, tiny_text_dir)
    structure = name.startswith("structure")
    assert type(data) is (FeaturePairDataModule if structure else ImageTextDataModule)
    assert type(module) is (StructureModule if structure else AlignModule)
    assert data.batch_size == cfg.data.batch_size
    # the module holds the experiment's loss: the same class and, for weighted sums, the same named terms
    assert type(module.loss).__name__ == cfg.loss._target_.rsplit(".", 1)[1]
    if "weights" in cfg.loss:
        assert dict(module.loss.weights) == {k: float(v) for k, v in cfg.loss.weights.items()}
    assert module.optimizer_factory.keywords["lr"] == cfg.optimizer.lr
    assert module.lr_schedule.kind == cfg.scheduler.kind
    assert trainer.max_epochs == cfg.epochs
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    assert trainer.precision == cfg.trainer.precision
    assert {type(c).__name__ for c in trainer.callbacks} >= {
        c._target_.rsplit(".", 1)[1] for c in cfg.callbacks.values() if c is not None and "_target_" in c
    }
