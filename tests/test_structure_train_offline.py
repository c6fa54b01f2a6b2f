"""structure_offline end to end on real offline encoders and real pairs (reduced sizes): zero-shot and retrieval go
up and the modality gap goes down, measured by the evaluation suite before and after training in the same run."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_train

from alignkit.eval.report import load_history
from alignkit.run.train import train

pytestmark = pytest.mark.slow

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLIPART = Path("/usr/share/openclipart/png")


def test_structure_offline_improves_zero_shot_retrieval_and_gap(tmp_path):
    assert FASHION.is_dir() and CLIPART.is_dir(), (
        "real offline data missing: make data (apt-get install dataset-fashion-mnist openclipart-png)"
    )
    cfg = compose_train(
        [
            "+experiment=structure_offline",
            f"paths.data_dir={tmp_path}/data",
            f"paths.cache_dir={tmp_path}/cache",
            "data.prepare.fashion_train=600",
            "data.prepare.clipart_train=300",
            "data.prepare.fashion_test=300",
            "data.prepare.clipart_test=100",
            "data.prepare.fashion_val=100",
            "data.prepare.clipart_val=50",
            "data.batch_size=128",
            "epochs=15",
            "loss.align.warmup_steps=50",
        ],
        tmp_path / "run",
    )
    summary = train(cfg)
    assert summary["global_step"] == 15 * ((600 + 300) * 2 // 128)  # two captions per image, floor rounding
    history = load_history(tmp_path / "run" / "metrics.json")
    assert sorted(history) == [0, summary["global_step"]]  # the evaluation callback: before and after
    before, after = history[0], history[summary["global_step"]]
    zs, i2t, t2i, gap = (
        "val/zs/fashion_mnist/top1",
        "val/ret/openclipart/i2t_r@5",
        "val/ret/openclipart/t2i_r@5",
        "val/gap/openclipart/l2",
    )
    assert after[zs] > before[zs] + 0.2, (before[zs], after[zs])
    assert after[i2t] > before[i2t] and after[t2i] > before[t2i], (before, after)
    assert after[gap] < before[gap] - 0.1, (before[gap], after[gap])
    assert (tmp_path / "run" / "model" / "model.json").is_file()
