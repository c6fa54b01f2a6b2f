"""The built wheel is a working package: configs inside, `alignkit train/eval` from any directory, user configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def test_wheel_trains_and_evaluates_from_another_directory(tmp_path):
    # --no-build-isolation: the build backend (setuptools) of this environment, no download
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
          "-w", str(tmp_path / "dist")], REPO, os.environ)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("alignkit-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts into site-packages
    assert (site / "alignkit" / "configs" / "train.yaml").is_file()

    user = tmp_path / "my_configs" / "experiment"
    user.mkdir(parents=True)
    # a user's own experiment, composed from the packaged smoke experiment (Hydra's --config-dir search path)
    (user / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\ntask_name: mine\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cli = [sys.executable, "-m", "alignkit.cli"]
    where = _run([sys.executable, "-c", "import alignkit; print(alignkit.__file__)"], work, env).stdout
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
    _run([*cli, "train", "--config-dir", str(tmp_path / "my_configs"), "+experiment=mine", "trainer.max_steps=2",
          "data.num_samples=64", "callbacks.evaluation.at_start=false", "run_id=w"], work, env)  # fmt: skip
    run = work / "outputs" / "mine" / "runs" / "w"  # paths.root_dir defaults to the working directory
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2
    assert (run / "open_clip" / "open_clip_config.json").is_file()
    _run([*cli, "eval", f"model.ckpt={run}", "evalsets=synthetic", "run_id=e"], work, env)
    metrics = json.loads((work / "outputs" / "eval" / "runs" / "e" / "metrics.json").read_text())
    assert "val/zs/shapes/top1" in metrics["2"]
