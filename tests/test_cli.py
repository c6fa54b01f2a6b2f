"""The ``alignkit`` console script: subcommands, --version, python -m alignkit, help titles, shell completion,
the config tree at start and the metrics table of ``alignkit eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from helpers import REPO
from omegaconf import OmegaConf
from PIL import Image

from alignkit.cli import main

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _alignkit(args: list[str], cwd, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignkit", *args],
        cwd=cwd,
        env={**ENV, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version_help_and_unknown_command(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"alignkit {version('alignkit')}"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(
        cmd in text for cmd in ("train", "eval", "export", "make-shards", "build-evalsets", "reproduce")
    )
    with pytest.raises(SystemExit, match=r"unknown command 'trian'.*train"):
        main(["trian"])


@pytest.mark.slow
def test_python_dash_m_alignkit_runs_the_cli(tmp_path):
    res = _alignkit(["--help"], tmp_path)
    assert res.returncode == 0 and "usage: alignkit COMMAND" in res.stdout
    res = _alignkit(["make-shards", "--help"], tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: alignkit make-shards")


def test_tool_subcommands_run_the_package_code(tmp_path, monkeypatch):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,c{i}\n" for i in range(3)))
    monkeypatch.chdir(tmp_path)
    assert main(["make-shards", "--csv", "pairs.csv", "--out", "s", "--per-shard", "2"]) == 0
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    assert main(["build-evalsets", "digits", "--out", "ev", "--limit", "12"]) in (0, None)
    # at least 4 shards: one for each of CLIP_benchmark's default workers
    assert (tmp_path / "ev" / "digits" / "test" / "nshards.txt").read_text() == "4\n"
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--help"])
    assert exit_.value.code == 0


@pytest.mark.slow
def test_hydra_help_title_and_one_word_completion_name(tmp_path):
    res = _alignkit(["eval", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("alignkit eval: evaluate") and "entry is powered by Hydra" not in res.stdout
    install = _alignkit(["train", "-sc", "install=bash"], tmp_path)
    assert install.returncode == 0, install.stderr
    assert install.stdout.rstrip().endswith("-F hydra_bash_completion alignkit")  # one word: the program
    # what bash runs on <TAB>: the whole line in COMP_LINE, the subcommand inside it
    line = "alignkit train optimizer.l"
    query = _alignkit(["-sc", "query=bash"], tmp_path, {"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert query.returncode == 0, query.stderr
    assert "optimizer.lr=" in query.stdout.split()


def test_config_tree_printed_unless_print_config_false(capsys):
    from alignkit.core.config_tree import print_config_tree

    cfg = OmegaConf.create(
        {"task_name": "t", "optimizer": {"lr": 0.5, "peak": "${.lr}"}, "print_config": True}
    )
    print_config_tree(cfg)
    out = capsys.readouterr().out
    assert out.startswith("CONFIG") and "optimizer" in out and "peak: 0.5" in out  # resolved
    cfg.print_config = False
    print_config_tree(cfg)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_eval_prints_the_config_tree_and_the_metrics_table_it_writes(tmp_path):
    res = _alignkit(["eval", "model.name=alignkit-tiny-vit", "evalsets=synthetic", "run_id=e"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("CONFIG") and "alignkit-tiny-vit" in res.stdout
    metrics = json.loads((tmp_path / "outputs" / "eval" / "runs" / "e" / "metrics.json").read_text())["0"]
    printed = dict(line.split() for line in (res.stdout + res.stderr).splitlines() if line.startswith("val/"))
    assert printed and set(printed) == set(metrics)
    assert all(float(printed[k]) == pytest.approx(v, abs=5e-5) for k, v in metrics.items())
