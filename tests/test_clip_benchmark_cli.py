"""The real ``clip_benchmark`` CLI, run exactly as README.md and the model card print it (default workers), on sets
from scripts/build_evalsets.py (a single-shard-sized one included), agrees with alignkit's eval."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import REPO, compose_train

from alignkit.core.hub import CARD_DIR, preprocess_cfg_of, run_card, write_open_clip_dir
from alignkit.encoders.openclip import register_shipped_configs
from alignkit.run.evaluate import evaluate

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _commands(text: str) -> list[str]:
    """Every ``clip_benchmark ...`` command in a markdown text, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0).strip() for m in re.finditer(r"^clip_benchmark .*$", joined, re.M)]


def _export(tmp_path: Path) -> Path:
    register_shipped_configs()
    torch.manual_seed(3)
    model = open_clip.create_model("alignkit-tiny-vit")
    cfg = open_clip.get_model_config("alignkit-tiny-vit")
    card = run_card("tiny", "alignkit-tiny-vit (random init)", None, None)
    return write_open_clip_dir(tmp_path / "refined", model.state_dict(), cfg, preprocess_cfg_of(model), card)


def _build(tmp_path: Path, which: str, limit: int) -> Path:
    out = tmp_path / "data" / "evalsets"
    _run([sys.executable, str(REPO / "scripts/build_evalsets.py"), which, "--out", str(out), "--limit", str(limit)],
         tmp_path)  # fmt: skip
    name = which.replace("-", "_")
    shards = sorted(p.name for p in (out / name / "test").glob("*.tar"))
    # CLIP_benchmark's default 4 workers each need a shard, named as its reader expects ({0..n-1}.tar)
    assert shards == ["0.tar", "1.tar", "2.tar", "3.tar"]
    assert (out / name / "test" / "nshards.txt").read_text().strip() == "4"
    return out / name


def _ours(tmp_path: Path, evalset: str) -> dict[str, float]:
    metrics = evaluate(
        compose_train(
            [
                f"model.name=local-dir:{tmp_path / 'refined'}",
                f"evalsets={evalset}",
                f"paths.data_dir={tmp_path / 'data'}",
            ],
            tmp_path / "ev",
            config_name="eval",
        )
    )["metrics"]
    assert 0.0 < metrics[f"val/zs/{evalset}/top1"] < 1.0  # a real number, not a degenerate 0 or 1
    return metrics


def test_readme_and_card_commands_as_printed_equal_eval(tmp_path):
    export = _export(tmp_path)
    _build(tmp_path, "fashion-mnist", 200)  # 200 images: one shard's worth, written as 4
    readme = _commands((REPO / "README.md").read_text())
    card = _commands((export / "README.md").read_text())
    assert len(readme) == 1 and len(card) == 1, (readme, card)
    assert "--no_amp" in card[0] and "--num_workers" not in card[0] + readme[0]
    ours = _ours(tmp_path, "fashion_mnist")
    for cmd in (readme[0], card[0].replace(CARD_DIR, "refined")):
        args = shlex.split(cmd)
        _run(args, tmp_path)
        result = json.loads((tmp_path / args[args.index("--output") + 1]).read_text())
        assert result["pretrained"] == "alignkit"
        # the same number of hits (one hit = 1/200): fp32 on both sides
        assert result["metrics"]["acc1"] == pytest.approx(ours["val/zs/fashion_mnist/top1"], abs=1e-6)
        assert result["metrics"]["acc5"] == pytest.approx(ours["val/zs/fashion_mnist/top5"], abs=1e-6)


def test_clip_benchmark_default_workers_on_digits(tmp_path):
    _export(tmp_path)
    root = _build(tmp_path, "digits", 300)
    out = tmp_path / "digits.json"
    _run(["clip_benchmark", "eval", "--model", f"local-dir:{tmp_path / 'refined'}", "--dataset", "wds/digits",
          "--dataset_root", str(root), "--task", "zeroshot_classification", "--no_amp", "--output", str(out)],
         tmp_path)  # fmt: skip
    theirs = json.loads(out.read_text())["metrics"]
    ours = _ours(tmp_path, "digits")
    assert theirs["acc1"] == pytest.approx(ours["val/zs/digits/top1"], abs=1e-6)
    assert theirs["acc5"] == pytest.approx(ours["val/zs/digits/top5"], abs=1e-6)
