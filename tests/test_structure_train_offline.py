"""structure_offline end to end on real offline encoders and real pairs (reduced sizes): zero-shot and retrieval go
up and the modality gap goes down, measured by the evaluation suite before and after training in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_train

from alignkit.train import train

pytestmark = pytest.mark.slow

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLIPART = Path("/usr/share/openclipart/png")


@pytest.mark.skipif(
    not (FASHION.is_dir() and CLIPART.is_dir()),
    reason="apt-get install dataset-fashion-mnist openclipart-png",
)
def test_structure_offline_improves_zero_shot_retrieval_and_gap(tmp_path):
    cfg = compose_train(
        [
            "+experiment=structure_offline",
            f"paths.data_dir={tmp_path}/data",
            f"paths.cache_dir={tmp_path}/cache",
            "data.prepare.fashion_train=600",
            "data.prepare.clipart_train=300",
            "data.prepare.fashion_test=300",
            "data.prepare.clipart_test=100",
            "data.batch_size=128",
            "epochs=15",
            "loss.align.warmup_steps=50",
        ],
        tmp_path / "run",
    )
    summary = train(cfg)
    assert summary["global_step"] == 15 * ((600 + 300) * 2 // 128)  # two captions per image, floor rounding
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = m["before"], m["after"]
    zs, i2t, t2i, gap = (
        "zs/fashion_mnist/top1",
        "ret/openclipart/i2t_r@5",
        "ret/openclipart/t2i_r@5",
        "gap/openclipart/l2",
    )
    assert after[zs] > before[zs] + 0.2, (before[zs], after[zs])
    assert after[i2t] > before[i2t] and after[t2i] > before[t2i], m["delta"]
    assert after[gap] < before[gap] - 0.1, (before[gap], after[gap])
    assert (tmp_path / "run" / "model" / "model.json").is_file()
