"""The built wheel is a working package: installed away from the checkout, its console script and
``python -m alignkit`` run the tools (make-shards, build-evalsets), train on the shards it made, evaluate, and
take user configs, all from an unrelated directory.

The module-scoped fixtures build the wheel once (``wheel``) and run the shared pipeline once (``pipeline``: shards,
a training run that exports ``open_clip/``, a one-shard Fashion-MNIST eval set); each test checks one client of it,
so a further client (e.g. the model card's ``clip_benchmark`` command) is one more test on ``pipeline``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from PIL import Image

pytestmark = pytest.mark.slow


def _run(args: list, cwd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@dataclass
class Wheel:
    site: Path  # where pip installed the wheel (--target)
    alignkit: Path  # its console script
    env: dict
    work: Path  # an unrelated working directory


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Wheel:
    tmp = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build backend (setuptools) of this environment, no download
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", REPO,
          "-w", tmp / "dist"], REPO, os.environ)  # fmt: skip
    (whl,) = (tmp / "dist").glob("alignkit-*.whl")
    site = tmp / "site"
    # what `pip install` does (console script included), into a folder of its own: the dependencies are this
    # environment's, the alignkit package only the wheel's
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, whl],
         tmp, os.environ)  # fmt: skip
    work = tmp / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return Wheel(site, site / "bin" / "alignkit", env, work)


@dataclass
class Pipeline:
    shards: Path
    run: Path  # a finished training run (with open_clip/)
    evalsets: Path  # data dir holding evalsets/fashion_mnist (one shard)


@pytest.fixture(scope="module")
def pipeline(wheel: Wheel) -> Pipeline:
    w = wheel.work
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
    (w / "img").mkdir()
    rows = []
    for i in range(48):
        name, rgb = list(colours.items())[i % 4]
        Image.new("RGB", (24 + i % 5, 24), rgb).save(w / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,a {name} square\n")
    (w / "img" / "bad.png").write_bytes(b"not an image")
    (w / "pairs.csv").write_text("image,caption\n" + "".join(rows) + "img/bad.png,a broken file\n")
    out = _run([wheel.alignkit, "make-shards", "--csv", "pairs.csv", "--out", "shards", "--per-shard", "16"],
               w, wheel.env)  # fmt: skip
    assert "failed_to_decode: 1" in out.stderr and "bad.png" in out.stderr
    _run([wheel.alignkit, "train", "+experiment=smoke", "data=webdataset", "data.train_shards=shards",
          "data.batch_size=8", "trainer.max_steps=2", "callbacks.evaluation.at_start=false", "run_id=s"],
         w, wheel.env)  # fmt: skip
    _run([wheel.alignkit, "build-evalsets", "fashion-mnist", "--out", "data/evalsets", "--limit", "200"],
         w, wheel.env)  # fmt: skip
    return Pipeline(w / "shards", w / "outputs" / "smoke" / "runs" / "s", w / "data")


def test_wheel_carries_configs_version_and_python_dash_m(wheel: Wheel):
    assert (wheel.site / "alignkit" / "configs" / "train.yaml").is_file()
    where = _run([sys.executable, "-c", "import alignkit; print(alignkit.__file__)"], wheel.work, wheel.env)
    assert where.stdout.startswith(str(wheel.site)), where.stdout  # the wheel's copy, not the checkout
    version = _run([wheel.alignkit, "--version"], wheel.work, wheel.env).stdout.strip()
    assert version == f"alignkit {_project_version()}"
    usage = _run([sys.executable, "-m", "alignkit", "--help"], wheel.work, wheel.env).stdout
    assert "make-shards" in usage and "build-evalsets" in usage and "reproduce" in usage


def _project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_wheel_tools_make_shards_and_one_shard_eval_set(pipeline: Pipeline):
    sizes = json.loads((pipeline.shards / "sizes.json").read_text())
    assert sum(sizes.values()) == 48 and len(sizes) == 4  # 49 rows, one undecodable image counted, not fatal
    assert sorted(p.name for p in pipeline.shards.glob("*.parquet")) == [f"0000{i}.parquet" for i in range(4)]
    fashion = pipeline.evalsets / "evalsets" / "fashion_mnist"
    # one shard's worth of images, written as 4 shards: one for each of CLIP_benchmark's default workers
    assert (fashion / "test" / "nshards.txt").read_text() == "4\n"
    assert sorted(p.name for p in (fashion / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar", "3.tar"]


def test_wheel_trains_on_its_shards_exports_and_evaluates(wheel: Wheel, pipeline: Pipeline):
    assert json.loads((pipeline.run / "summary.json").read_text())["global_step"] == 2
    assert (pipeline.run / "open_clip" / "open_clip_config.json").is_file()
    out = _run([wheel.alignkit, "eval", f"model.ckpt={pipeline.run}", "evalsets=fashion_mnist",
                f"paths.data_dir={pipeline.evalsets}", "run_id=e"], wheel.work, wheel.env)  # fmt: skip
    metrics = json.loads((wheel.work / "outputs" / "eval" / "runs" / "e" / "metrics.json").read_text())["2"]
    top1 = metrics["val/zs/fashion_mnist/top1"]
    assert "val/zs/fashion_mnist/top1" in out.stderr + out.stdout and 0.0 <= top1 <= 1.0


def test_wheel_takes_a_user_experiment_from_config_dir(wheel: Wheel, tmp_path):
    user = tmp_path / "my_configs" / "experiment"
    user.mkdir(parents=True)
    # a user's own experiment, composed from the packaged smoke experiment (Hydra's --config-dir search path)
    (user / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\ntask_name: mine\n")
    _run([sys.executable, "-m", "alignkit", "train", "--config-dir", tmp_path / "my_configs", "+experiment=mine",
          "trainer.max_steps=2", "data.num_samples=64", "callbacks.evaluation.at_start=false", "print_config=false",
          "run_id=w"], wheel.work, wheel.env)  # fmt: skip
    run = wheel.work / "outputs" / "mine" / "runs" / "w"  # paths.root_dir defaults to the working directory
    assert json.loads((run / "summary.json").read_text())["global_step"] == 2
