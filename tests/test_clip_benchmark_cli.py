"""The real ``clip_benchmark`` CLI evaluates an alignkit export (``--model local-dir:DIR``) and agrees with eval.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import REPO, compose_train

from alignkit.encoders.openclip import register_shipped_configs
from alignkit.eval.entry import evaluate
from alignkit.run.hub import preprocess_cfg_of, write_open_clip_dir

pytestmark = pytest.mark.slow
CLIP_BENCHMARK = Path(sys.executable).parent / "clip_benchmark"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_clip_benchmark_zero_shot_equals_eval_py(tmp_path):
    register_shipped_configs()
    torch.manual_seed(3)
    model = open_clip.create_model("alignkit-tiny-vit")
    export = tmp_path / "export"
    cfg = open_clip.get_model_config("alignkit-tiny-vit")
    write_open_clip_dir(export, model.state_dict(), cfg, preprocess_cfg_of(model), "card")
    _run(
        [sys.executable, str(REPO / "scripts/build_evalsets.py"), "digits", "--out", str(tmp_path / "evalsets"),
         "--limit", "300"],
        tmp_path,
    )  # fmt: skip
    out = tmp_path / "digits.json"
    # --no_amp: clip_benchmark autocasts by default, which on CPU means bfloat16; eval.py's default is fp32
    _run(
        [str(CLIP_BENCHMARK), "eval", "--model", f"local-dir:{export}", "--dataset", "wds/digits",
         "--dataset_root", str(tmp_path / "evalsets" / "digits"), "--task", "zeroshot_classification",
         "--batch_size", "64", "--num_workers", "0", "--no_amp", "--output", str(out)],
        tmp_path,
    )  # fmt: skip
    theirs = json.loads(out.read_text())["metrics"]
    ours = evaluate(
        compose_train(
            [f"model.name=local-dir:{export}", "evalsets=digits", f"paths.data_dir={tmp_path}"],
            tmp_path / "ev",
            config_name="eval",
        )
    )["metrics"]
    assert 0.0 < ours["val/zs/digits/top1"] < 1.0  # a real number, not a degenerate 0 or 1
    # the same number of hits (one hit = 1/300); ours went through float32
    assert theirs["acc1"] == pytest.approx(ours["val/zs/digits/top1"], abs=1e-6)
    assert theirs["acc5"] == pytest.approx(ours["val/zs/digits/top5"], abs=1e-6)
