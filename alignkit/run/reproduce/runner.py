"""What every run of the offline replication shares: the scales, the validation score, and one training call
that composes ``+experiment=NAME`` + overrides and runs ``alignkit.run.train.train`` in this process (reusing a
run directory that already holds a finished run with the same settings).

Part A (:mod:`alignkit.run.reproduce.offline`), Part B (:mod:`alignkit.run.reproduce.part_b`) and the paper-scale
recipes (:mod:`alignkit.run.reproduce.recipes`) import from here, never from each other.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from alignkit.core.configs import CONFIG_DIR
from alignkit.run.train import train

__all__ = [
    "QUIET", "SCALES", "SETS", "Clock", "NotRun", "Scale", "config_key", "mean_std", "relative", "slug",
    "split_metrics", "train_run", "val_score",
]  # fmt: skip

SETS = ("fashion_mnist", "openclipart")
# Every run of the table: fresh (no resume), no checkpoints, no progress bar (the runner prints progress).
QUIET = (
    "ckpt_path=null",
    "~callbacks.checkpoint",
    "~callbacks.progress",
    "~callbacks.preemption",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
)


@dataclass(frozen=True)
class Scale:
    """Sizes and grids of one reproduction (``full``: the README table; ``tiny``: the test suite's)."""

    splits: dict[str, int]
    seeds: tuple[int, ...] = (0, 1, 2)
    low_n: tuple[int, ...] = (
        1000,
        250,
    )  # 1,000 pairs: 20 % of the 5,000-pair pool; 250: 5 % (paper: ~1.25 %)
    low_epochs: tuple[int, ...] = (20, 100)
    rs_lambdas: tuple[float, ...] = (1.0, 10.0, 30.0)  # R_S's λ grid, chosen on validation (released: 10)
    a_overrides: tuple[str, ...] = ()
    b_batch: int = 64
    b_lrs: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    b_overrides: tuple[str, ...] = ()
    eval_batch: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


SCALES = {
    "full": Scale(
        splits=dict(fashion_align=3000, fashion_refine=400, fashion_val=500, fashion_test=1000,
                    clipart_align=2000, clipart_refine=400, clipart_val=300, clipart_test=500),
        low_epochs=(20, 100),
    ),
    "tiny": Scale(
        splits=dict(fashion_align=160, fashion_refine=40, fashion_val=60, fashion_test=100,
                    clipart_align=100, clipart_refine=24, clipart_val=40, clipart_test=50),
        seeds=(0,), low_n=(100,), low_epochs=(2, 4), b_batch=32, b_lrs=(1e-5,), rs_lambdas=(10.0,),
        a_overrides=("data.batch_size=64", "data.selection.n_samples=200",
                     "loss.align.warmup_steps=5"),
    ),
}  # fmt: skip


def val_score(m: Mapping[str, float]) -> float:
    """The one number every validation choice maximises (module docstring)."""
    return m["zs/fashion_mnist/top1"] + (m["ret/openclipart/i2t_r@1"] + m["ret/openclipart/t2i_r@1"]) / 2


def slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", row)


class Clock:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.t0, self.say = time.monotonic(), say

    def __call__(self, msg: str) -> None:
        s = time.monotonic() - self.t0
        self.say(f"[{int(s) // 60:02d}:{int(s) % 60:02d}] {msg}")


def compose_run(experiment: str, overrides: Sequence[str], run_dir: Path):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=[f"+experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def train_run(
    experiment: str,
    overrides: Sequence[str],
    run_dir: Path,
    evalsets: dict | None = None,
    encoder_patch: Mapping[str, Any] | None = None,
    resume: bool = True,
    only_finished: bool = False,
) -> dict:
    """``alignkit.run.train.train`` on ``+experiment=EXPERIMENT`` + overrides in ``run_dir``; ``evalsets`` /
    ``encoder_patch`` set config values that are awkward as override strings (dicts of eval-set nodes).
    ``resume``: a run directory that holds a finished run with the same settings is reused, not retrained
    (an interrupted reproduction picks up where it stopped). ``only_finished``: raise :class:`NotRun` instead
    of training."""
    cfg = compose_run(experiment, overrides, run_dir)
    with open_dict(cfg):
        if evalsets is not None:
            cfg.evalsets = OmegaConf.create(evalsets)
        for k, v in (encoder_patch or {}).items():
            cfg.encoder[k] = v
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = f"+experiment={experiment}\n" + "\n".join(overrides) + "\n"
    if evalsets is not None or encoder_patch is not None:
        spec += (
            json.dumps({"evalsets": evalsets, "encoder": encoder_patch}, sort_keys=True, default=str) + "\n"
        )
    done = run_dir / "summary.json"
    previous = run_dir / "overrides.txt"
    if resume and done.is_file() and previous.is_file() and previous.read_text() == spec:
        return json.loads(done.read_text())  # finished earlier with the very same settings
    if only_finished:
        raise NotRun(str(run_dir))
    done.unlink(missing_ok=True)  # written by train() at the end: its presence marks a finished run
    (run_dir / "overrides.txt").write_text(spec)
    return train(cfg)


class NotRun(RuntimeError):
    """A run that has not finished, met in ``only_finished`` mode."""


def config_key(cfg: Any) -> str:
    """The composed config minus where it is written: equal keys train the same model."""
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("task_name", None)
    c.get("paths", {}).pop("output_dir", None)
    return json.dumps(c, sort_keys=True, default=str)


def mean_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def split_metrics(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``val/zs/test_fashion_mnist/top1`` -> ``zs/fashion_mnist/top1`` for the sets of one split."""
    out = {}
    for k, v in metrics.items():
        parts = k.removeprefix("val/").split("/")
        if len(parts) == 3 and parts[1].startswith(prefix + "_"):
            out[f"{parts[0]}/{parts[1].removeprefix(prefix + '_')}/{parts[2]}"] = float(v)
    return out


def relative(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it, else as given (never made absolute)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
