"""Shared helpers of the benchmarks: statistics, peak memory, composing and building alignkit as train.py does."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def stats(xs: Sequence[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1], "n": len(xs)}


def fmt(s: dict[str, float], unit: str = "", scale: float = 1.0) -> str:
    return f"min {s['min'] * scale:.4g}{unit} / median {s['median'] * scale:.4g}{unit} / max {s['max'] * scale:.4g}{unit}"


def ratio(a: dict[str, float], b: dict[str, float]) -> str:
    """a/b on medians and on minima (the minimum is the least noisy on a shared machine)."""
    return f"{a['median'] / b['median']:.3f}x (median), {a['min'] / b['min']:.3f}x (min)"


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss` (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0: ``5`` > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_peak_rss(script: str, args: Sequence[str], timeout: int = 600) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line (with its peak RSS) last."""
    res = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if res.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s) visible, torch "
        f"{torch.__version__} with {torch.get_num_threads()} thread(s), python {platform.python_version()}"
    )


def header(title: str, cmd: str | None = None) -> None:
    print(f"== {title}")
    print(f"   machine: {machine()}")
    print(f"   command: {cmd or ' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"   started: {time.strftime('%Y-%m-%d %H:%M:%S')}")


def compose(overrides: list[str]):
    """configs/train.yaml composed as the CLI would (the run directory set to a temp dir)."""
    import tempfile

    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from alignkit.core.configs import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = hcompose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix="alignkit-bench-")
    return cfg


def build(cfg, steps: int, extra_callbacks: Sequence = ()):
    """The run exactly as ``alignkit.run.train.train`` builds it (``alignkit.run.build.build_run``): data node,
    module, trainer with the config's callbacks and loggers (+ ``extra_callbacks``) and its batch plan.

    A benchmark feeds ``steps`` batches of its own, so the config must plan one epoch of exactly ``steps`` optimizer
    steps (e.g. ``data.num_samples`` = steps x ``data.batch_size``): the trainer then stops after them by itself."""
    from alignkit.run.build import build_run

    run = build_run(cfg, extra_callbacks=extra_callbacks)
    if (run.plan.steps_per_epoch, run.trainer.max_steps) != (steps, steps):
        raise ValueError(
            f"the benchmark feeds {steps} batches but the config plans {run.plan.steps_per_epoch} steps per epoch "
            f"and {run.trainer.max_steps} optimizer steps: set data.num_samples={steps * run.plan.per_device} "
            "(one epoch, no accumulation)"
        )
    return run


def _clock_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class StepTimesToFile(_clock_base()):
    """A callback for benchmark runs of ``train.py``: the wall time of every step end, written as JSON at the end.

    ``python train.py ... +callbacks.clock._target_=bench_common.StepTimesToFile +callbacks.clock.path=F``
    (with ``scripts/`` on ``PYTHONPATH``).
    """

    def __init__(self, path: str) -> None:
        self.path, self.ends = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps({"ends": self.ends, "peak_rss_mb": peak_rss_mb()}))
