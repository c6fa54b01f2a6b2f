"""2-process gloo DDP: the callback's sharded + gathered evaluation equals a single-process evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO
from omegaconf import open_dict

from alignkit.run.evaluate import evaluate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_ddp_evaluation_gathers_the_single_process_numbers(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "+experiment=smoke",
            "trainer.devices=2",
            # the clip_refine loss keeps an unused (weight-0) contrastive logit scale: not a concern of this test
            "+trainer.strategy=ddp_find_unused_parameters_true",
            "data.num_samples=128",
            "epochs=1",  # 128 / (32 x 2) = 2 steps
            "callbacks.evaluation.every_n_steps=0",
            "export=false",
            f"paths.log_dir={tmp_path}",
            "run_id=ddp",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    # both ranks encoded their own slice (90 classification images: 45 each; 18 retrieval images: 9 each)
    assert "evaluated shapes: 90 images (rank 1/2 encoded 45 of them)" in out, out[-4000:]
    run_dir = tmp_path / "smoke" / "runs" / "ddp"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(map(int, history)) == [0, 2]

    from hydra import compose, initialize_config_dir

    from alignkit.run.evaluate import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="eval", overrides=[f"model.ckpt={run_dir}", "evalsets=synthetic"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "single")
    single = evaluate(cfg)  # one process, no process group: the same code without the collective
    assert single["step"] == 2
    assert set(single["metrics"]) == set(history["2"])
    for k, v in single["metrics"].items():
        assert history["2"][k] == pytest.approx(v, abs=1e-5), k
