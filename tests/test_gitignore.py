"""What runs, builds and scripts generate in the checkout is ignored by git (never shows as untracked)."""

from __future__ import annotations

import subprocess

import pytest
from helpers import REPO

GENERATED = [
    "data/evalsets/fashion_mnist/test/0.tar",  # make demo / scripts/build_evalsets.py (paths.data_dir)
    "data/pairs/train.csv",  # scripts/build_offline_pairs.py
    "outputs/smoke/runs/x/checkpoints/last.ckpt",  # paths.log_dir
    "outputs/smoke/multiruns/x/0/summary.json",
    ".cache/alignkit/features/layer_0.npy",  # paths.cache_dir
    "multirun/2026-01-01/x.yaml",  # Hydra's default multirun dir (when paths are overridden)
    "wandb/offline-run-x/run-x.wandb",
    "lightning_logs/version_0/hparams.yaml",
    "build/lib/alignkit/configs/train.yaml",  # pip wheel . / pip install .
    "dist/alignkit-0.1.0-py3-none-any.whl",
    "alignkit.egg-info/PKG-INFO",
    "optuna.db",  # hparams_search with hydra.sweeper.storage=sqlite:///optuna.db
]


@pytest.mark.parametrize("path", GENERATED)
def test_generated_path_is_ignored(path):
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
    assert proc.returncode == 0, f"{path} would show up as untracked; add it to .gitignore"


def test_tracked_sources_are_not_ignored():
    proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", "configs/data/csv.yaml"], cwd=REPO)
    assert proc.returncode == 1  # configs/data/ (a config group) is not caught by the /data/ rule
