"""The training entry: configs compose, typos fail, the CLI runs, loss falls on a learnable toy, resume works."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_train, synthetic_shards

from alignkit.run.train import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


def test_clip_refine_is_the_released_recipe():
    cfg = compose_train(["+experiment=clip_refine", "data.train_shards='/x/{0..1}.tar'"])
    assert (cfg.encoder.model, cfg.encoder.pretrained, cfg.encoder.force_quick_gelu) == (
        "ViT-B-32",
        "openai",
        True,
    )
    assert (cfg.epochs, cfg.data.batch_size, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        1,
        512,
        1e-6,
        0.1,
    )
    assert cfg.scheduler.kind == "constant" and cfg.scheduler.warmup_steps == 0
    assert dict(cfg.loss.weights) == {"rafa": 1.0, "hycd": 1.0, "contrastive": 0.0}
    assert cfg.loss.hycd.alpha == 0.5 and cfg.loss.rafa.prior == "normal" and cfg.loss.rafa.shared
    assert cfg.module.weight_decay_on_all and cfg.trainer.precision == "32-true"
    kd = compose_train(["+experiment=self_kd"])
    assert kd.loss.hycd.alpha == 0.0 and kd.loss.weights.rafa == 0.0
    over = compose_train(
        ["+experiment=clip_refine", "loss.hycd.alpha=0.3", "optimizer.lr=2e-6", "encoder.model=ViT-B-16"]
    )
    assert (over.loss.hycd.alpha, over.optimizer.lr, over.encoder.model) == (0.3, 2e-6, "ViT-B-16")


def _run_cli(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # a fresh interpreter (~8 s)
def test_typo_override_fails_with_a_clear_message(tmp_path):
    res = _run_cli(["+experiment=smoke", "trainer.max_stepz=3"], tmp_path, timeout=120)
    assert res.returncode != 0
    assert "max_stepz" in res.stderr and ("not in struct" in res.stderr or "Could not override" in res.stderr)


@pytest.mark.slow  # a fresh interpreter (~8 s)
def test_offline_weights_stop_at_once_with_instructions(tmp_path):
    synthetic_shards(tmp_path / "shards", n=16, per_shard=16)
    res = _run_cli(
        [
            "+experiment=clip_refine",
            f"data.train_shards={tmp_path}/shards/00000.tar",
            f"paths.log_dir={tmp_path}/out",
        ],
        tmp_path,
        timeout=120,
    )
    assert res.returncode != 0 and "encoder.pretrained=/path/to" in res.stderr


def test_cli_smoke_run_leaves_a_complete_run_directory(tmp_path):
    res = _run_cli(
        [
            "+experiment=smoke",
            "trainer.max_steps=6",
            "callbacks.checkpoint.every_n_train_steps=4",
            f"paths.log_dir={tmp_path}",
            "run_id=cli",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "smoke" / "runs" / "cli"
    for f in (
        "config.yaml",
        "summary.json",
        "open_clip/open_clip_model.safetensors",
        "open_clip/README.md",
        "checkpoints/last.ckpt",
        "csv/version_0/metrics.csv",
        "train.log",
    ):
        assert (run / f).is_file(), f
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 6
    assert "Epoch 0" in res.stdout + res.stderr  # the progress bar


def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_smoke_on_generated_shards_loss_goes_down(tmp_path):
    synthetic_shards(tmp_path / "shards", n=256, per_shard=64)
    cfg = compose_train(
        [
            "+experiment=smoke",
            "data=webdataset",
            f"data.train_shards='{tmp_path}/shards/{{00000..00003}}.tar'",
            "data.num_samples=null",
            "data.batch_size=32",
            "data.num_workers=2",
            "data.pin_memory=false",
            "epochs=5",
            "trainer.log_every_n_steps=1",
            "export=false",
        ],
        tmp_path / "run",
    )
    summary = train(cfg)
    assert summary["global_step"] == 40  # 256 / 32 = 8 steps per epoch x 5 epochs
    losses = _losses(tmp_path / "run")
    first = sum(losses[s] for s in range(5)) / 5
    last = sum(losses[s] for s in range(35, 40)) / 5
    assert last < 0.9 * first, (first, last)


def test_resume_from_a_mid_run_checkpoint_continues_at_the_right_step(tmp_path):
    base = [
        "+experiment=smoke",
        "data.num_samples=128",
        "epochs=2",
        "trainer.log_every_n_steps=1",
        "export=false",
        "callbacks.checkpoint.every_n_train_steps=3",
    ]
    run = tmp_path / "run"
    first = train(compose_train([*base, "trainer.max_steps=5"], run))  # "interrupted" after 5 of 8 steps
    assert first["global_step"] == 5 and first["resumed_from"] is None
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    second = train(compose_train(base, run))  # ckpt_path=auto picks up last.ckpt
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 8
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 8


def test_wandb_offline_and_tensorboard_loggers_keep_the_run_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = [
        "+experiment=smoke",
        "logger=many",
        "data.num_samples=64",
        "epochs=1",
        "export=false",
        "trainer.log_every_n_steps=1",
    ]
    run = tmp_path / "run"
    train(compose_train([*base, "trainer.max_steps=1"], run))
    run_id = (run / "wandb_id").read_text().strip()
    offline_runs = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs, list((run / "wandb").iterdir())
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    train(compose_train(base, run))  # resumed: same wandb run id, new offline segment of the same run
    assert (run / "wandb_id").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
