"""``scripts/bench_gpu.py --tiny --device cpu``: the GPU benchmark's code path (bare loop, alignkit through the
Trainer, ratios) runs end to end on CPU, so the script a GPU session runs once is not first exercised there."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_bench_gpu_dry_run_prints_bare_and_alignkit_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench_gpu.py", "--tiny", "--device", "cpu", "--batches", "4", "--steps", "3",
           "--warmup", "1", "--no-peer", "--precision", "32-true"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT / "scripts", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for loss in ("contrastive", "clip_refine"):
        bare = re.search(rf"bare +{loss} +batch 4: ([\d.]+) samples/s", proc.stdout)
        ours = re.search(rf"alignkit {loss} +batch 4: ([\d.]+) samples/s, ([\d.]+) GFLOP/step", proc.stdout)
        ratio = re.search(rf"ratio alignkit / bare {loss} batch 4: ([\d.]+)x", proc.stdout)
        assert bare and ours and ratio, proc.stdout[-3000:]
        assert float(bare[1]) > 0 and float(ours[1]) > 0 and float(ours[2]) > 0
        assert float(ratio[1]) == pytest.approx(float(ours[1]) / float(bare[1]), rel=0.01)
