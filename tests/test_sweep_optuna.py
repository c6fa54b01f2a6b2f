"""hparams_search=optuna: Hydra's Optuna sweeper runs trials of the smoke experiment and maximises a final metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.slow
METRIC = "val/zs/shapes/top1"


def test_three_trial_optuna_sweep_on_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", "+experiment=smoke", "hparams_search=optuna",
         f"optimized_metric={METRIC}", "hydra.sweeper.n_trials=3", "trainer.max_steps=2", "data.num_samples=64",
         "callbacks.progress.refresh_rate=0", "callbacks.evaluation.at_start=false",
         f"paths.log_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = (tmp_path / "smoke" / "multiruns").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    values, lrs = [], set()
    for t in trials:
        values.append(json.loads((t / "summary.json").read_text())["metrics"][METRIC])
        lrs.add(yaml.safe_load((t / "config.yaml").read_text())["optimizer"]["lr"])
    assert len(lrs) == 3  # three sampled learning rates
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(values))  # the sweeper saw what each trial returned
    assert 1e-6 <= result["best_params"]["optimizer.lr"] <= 1e-2


def test_missing_metric_is_a_clear_error():
    from omegaconf import OmegaConf

    from alignkit.run.train import objective

    cfg = OmegaConf.create({"optimized_metric": "val/zs/nope/top1"})
    with pytest.raises(ValueError, match=r"not logged by this run; its final metrics are \['train/loss'\]"):
        objective(cfg, {"metrics": {"train/loss": 1.0}})
    assert objective(OmegaConf.create({"optimized_metric": None}), {"metrics": {}}) is None
