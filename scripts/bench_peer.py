"""Benchmark 2: alignkit's ``train.py`` against open_clip's own trainer (``open_clip_train``) on the same job.

Same tiny model config (the shipped JSON registered with ``open_clip.add_model_config``), the same webdataset
shards (written once with ``alignkit.data.shards.write_shards``), the same per-device batch, the same number of
data workers, AdamW with constant LR, fp32, CPU, plain contrastive loss (open_clip semantics: normalised features x
the model's logit scale). Both run as subprocesses, alternating (A, B, A, B, ...). Steady-state samples/s comes
from windows of ``--window`` steps after warm-up: open_clip_train logs the mean batch time of each window
(``Batch (t)``, data wait included); alignkit's step ends are recorded by a callback (data wait included too).

Differences left as they are (each is the tool's default and what its users get): open_clip_train trains on its
*training* transform (RandomResizedCrop) while alignkit's default is the eval transform (the CLIP-Refine recipe);
alignkit runs its default callbacks (checkpointing, LR monitor, progress bar) and CSV logger.

    python scripts/bench_peer.py [--samples 2048 --batch 32 --workers 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common as bc

from alignkit.data.shards import write_shards
from alignkit.data.synthetic import SyntheticShapes
from alignkit.encoders.openclip import MODEL_CONFIG_DIR

OC_LAUNCH = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)
BATCH_T = re.compile(r"Batch \(t\): ([0-9.]+)")


def env(threads: int) -> dict:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=f"{bc.REPO / 'scripts'}:{bc.REPO}",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return e


def run_open_clip(
    args, shards: Path, n_shards: int, out: Path, device: str = "cpu", precision: str = "fp32"
) -> dict:
    cmd = [
        sys.executable, "-c", OC_LAUNCH, str(MODEL_CONFIG_DIR),
        "--train-data", f"{shards}/{{00000..{n_shards - 1:05d}}}.tar", "--dataset-type", "webdataset",
        "--train-num-samples", str(args.samples), "--batch-size", str(args.batch), "--model", args.model,
        "--epochs", "1", "--workers", str(args.workers), "--device", device, "--precision", precision,
        "--lr", str(args.lr), "--wd", "0.1", "--warmup", "0", "--lr-scheduler", "const",
        "--log-every-n-steps", str(args.window), "--logs", str(out), "--name", "oc", "--report-to", "",
        "--save-frequency", "0", "--seed", "0",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(args.threads), cwd=out, timeout=900)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{text[-3000:]}")
    windows = [float(x) for x in BATCH_T.findall(text)]
    # First line covers step 0 alone, the last may be a partial window: keep the full windows after warm-up.
    steady = windows[1 + args.warmup_windows : -1]
    return {"window_s": steady, "cmd": " ".join(cmd)}


def run_alignkit(
    args, shards: Path, out: Path, gpu: bool = False, precision: str = "32-true", extra: tuple = ()
) -> dict:
    clock = out / "clock.json"
    cmd = [
        sys.executable, str(bc.REPO / "train.py"), "encoder=tiny", f"encoder.model={args.model}",
        "data=webdataset", f"data.train_shards={shards}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", "trainer=default" if gpu else "trainer=cpu",
        f"trainer.precision={precision}", "loss=contrastive", f"optimizer.lr={args.lr}",
        f"paths.log_dir={out}", "export=false", "seed=0",
        "+callbacks.clock._target_=bench_common.StepTimesToFile", f"+callbacks.clock.path={clock}", *extra,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(args.threads), cwd=out, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"alignkit train.py failed:\n{(res.stdout + res.stderr)[-3000:]}")
    data = json.loads(clock.read_text())
    ends = data["ends"]
    w = args.window
    windows = [(ends[i + w] - ends[i]) / w for i in range(0, len(ends) - w, w)]
    return {"window_s": windows[args.warmup_windows :], "cmd": " ".join(cmd[1:]), "peak": data["peak_rss_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="alignkit-tiny-vit")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument(
        "--image-size", type=int, default=64, help="stored image size (resized by each preprocess)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--warmup-windows", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    bc.header("alignkit train.py vs open_clip_train (benchmark 2)")
    tmp = Path(tempfile.mkdtemp(prefix="alignkit-peer-"))
    ds = SyntheticShapes(None, args.samples, args.image_size, 0)
    paths = write_shards((ds.item(i) for i in range(args.samples)), tmp / "shards", args.per_shard)
    print(f"   {args.samples} pairs in {len(paths)} shards, model {args.model}, batch {args.batch}, "
          f"{args.workers} workers, {args.threads} torch thread(s) each, fp32, CPU")  # fmt: skip
    res: dict[str, list[float]] = {"alignkit": [], "open_clip_train": []}
    for rep in range(args.repeats):
        a = run_alignkit(args, tmp / "shards", Path(tempfile.mkdtemp(dir=tmp)))
        o = run_open_clip(args, tmp / "shards", len(paths), Path(tempfile.mkdtemp(dir=tmp)))
        res["alignkit"] += a["window_s"]
        res["open_clip_train"] += o["window_s"]
        print(f"   repeat {rep}: alignkit {args.batch / statistics.median(a['window_s']):.1f} samples/s, "
              f"open_clip_train {args.batch / statistics.median(o['window_s']):.1f} samples/s "
              f"(alignkit peak RSS {a['peak']:.0f} MiB, main process)", flush=True)  # fmt: skip
        if rep == 0:
            print(f"   alignkit:        python {a['cmd']}\n   open_clip_train: {o['cmd']}")
    thr = {k: bc.stats([args.batch / w for w in v]) for k, v in res.items()}
    print(f"\nsteady-state samples/s (per window of {args.window} steps, after warm-up):")
    for k, s in thr.items():
        print(f"   {k:16s} {bc.fmt(s)}")
    a, o = thr["alignkit"], thr["open_clip_train"]
    print(f"\nratio alignkit / open_clip_train throughput: {a['median'] / o['median']:.3f}x (median), "
          f"{a['max'] / o['max']:.3f}x (best window)   target >= 1.0")  # fmt: skip


if __name__ == "__main__":
    main()
