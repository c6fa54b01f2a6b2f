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


# open_clip_train imports pandas at module level (for its CSV datasets; the webdataset path never uses it) and
# the project venv has no pandas: install it aside, e.g. `pip install --no-deps --target /tmp/alignkit-oc-extra
# pandas`, and point ALIGNKIT_PEER_PYTHONPATH there. Only the open_clip_train subprocess sees it.
PEER_PATH = os.environ.get("ALIGNKIT_PEER_PYTHONPATH", "/tmp/alignkit-oc-extra")


def env(threads: int, extra_path: str = "") -> dict:
    e = dict(os.environ)
    path = f"{bc.REPO / 'scripts'}:{bc.REPO}" + (f":{extra_path}" if extra_path else "")
    e.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=path,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return e


def run_open_clip(
    args,
    shards: Path,
    n_shards: int,
    out: Path,
    device: str = "cpu",
    precision: str = "fp32",
    tsv: Path | None = None,
) -> dict:
    """open_clip_train on the shards, or (``tsv``) on the same pairs as JPEG files + a TSV (``--dataset-type csv``)."""
    data = (
        ["--train-data", str(tsv), "--dataset-type", "csv", "--csv-img-key", "filepath",
         "--csv-caption-key", "title", "--csv-separator", "\t"]
        if tsv is not None
        else ["--train-data", f"{shards}/{{00000..{n_shards - 1:05d}}}.tar", "--dataset-type", "webdataset",
              "--train-num-samples", str(args.samples)]
    )  # fmt: skip
    cmd = [
        sys.executable, "-c", OC_LAUNCH, str(MODEL_CONFIG_DIR),
        *data, "--batch-size", str(args.batch), "--model", args.model,
        "--epochs", "1", "--workers", str(args.workers), "--device", device, "--precision", precision,
        "--lr", str(args.lr), "--wd", "0.1", "--warmup", "0", "--lr-scheduler", "const",
        "--log-every-n-steps", str(args.window), "--logs", str(out), "--name", "oc", "--report-to", "",
        "--save-frequency", "0", "--seed", "0",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env(args.threads, PEER_PATH), cwd=out, timeout=900
    )
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"open_clip_train failed:\n{text[-3000:]}")
    windows = [float(x) for x in BATCH_T.findall(text)]
    # First line covers step 0 alone, the last may be a partial window: keep the full windows after warm-up.
    steady = windows[1 + args.warmup_windows : -1]
    return {"window_s": steady, "cmd": " ".join(cmd)}


def run_alignkit(
    args,
    shards: Path,
    out: Path,
    gpu: bool = False,
    precision: str = "32-true",
    extra: tuple = (),
    tsv: Path | None = None,
) -> dict:
    """alignkit's train.py on the shards, or (``tsv``) on the same pairs as JPEG files + a TSV (``data=csv``)."""
    clock = out / "clock.json"
    data = (
        ["data=csv", f"data.train_csv={tsv}", "data.image_col=filepath", "data.caption_col=title"]
        if tsv is not None
        else ["data=webdataset", f"data.train_shards={shards}"]
    )
    cmd = [
        sys.executable, str(bc.REPO / "train.py"), "encoder=tiny", f"encoder.model={args.model}",
        *data, f"data.batch_size={args.batch}",
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
    tsv = write_tsv(ds, tmp / "files")
    print(f"   {args.samples} pairs as {len(paths)} webdataset shards and as JPEG files + TSV; model {args.model}, "
          f"batch {args.batch}, {args.workers} workers, {args.threads} torch thread(s) each, fp32, CPU")  # fmt: skip
    try:
        run_open_clip(args, tmp / "shards", len(paths), Path(tempfile.mkdtemp(dir=tmp)))
        oc_wds = True
    except RuntimeError as err:
        oc_wds = False
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"\w*(Error|Exception)\b", ln)]  # not torch's log lines
        print(
            f"   open_clip_train cannot read webdataset shards here ({(errors or lines)[-1]}); it runs on the TSV"
        )
    runs = {
        "alignkit webdataset": lambda d: run_alignkit(args, tmp / "shards", d),
        "alignkit csv": lambda d: run_alignkit(args, tmp / "shards", d, tsv=tsv),
        "open_clip_train csv": lambda d: run_open_clip(args, tmp / "shards", len(paths), d, tsv=tsv),
    }
    if oc_wds:
        runs["open_clip_train webdataset"] = lambda d: run_open_clip(args, tmp / "shards", len(paths), d)
    res: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        line = []
        for name, fn in runs.items():
            r = fn(Path(tempfile.mkdtemp(dir=tmp)))
            res[name] += r["window_s"]
            line.append(f"{name} {args.batch / statistics.median(r['window_s']):.1f}")
            if rep == 0:
                print(f"   command ({name}): {r['cmd']}")
        print(f"   repeat {rep} samples/s: " + ", ".join(line), flush=True)
    thr = {k: bc.stats([args.batch / w for w in v]) for k, v in res.items()}
    print(f"\nsteady-state samples/s (per window of {args.window} steps, after warm-up):")
    for k, s in thr.items():
        print(f"   {k:28s} {bc.fmt(s)}")
    o = thr.get("open_clip_train webdataset", thr["open_clip_train csv"])
    for k in ("alignkit webdataset", "alignkit csv"):
        a = thr[k]
        print(f"ratio {k} / open_clip_train ({'webdataset' if oc_wds else 'csv'}): "
              f"{a['median'] / o['median']:.3f}x (median window)   target >= 1.0")  # fmt: skip
    a, o = thr["alignkit csv"], thr["open_clip_train csv"]
    print(f"ratio alignkit csv / open_clip_train csv (same loader type): {a['median'] / o['median']:.3f}x")


def write_tsv(ds: SyntheticShapes, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(len(ds)):
        img, caption = ds.item(i)
        p = out / f"{i:09d}.jpg"
        img.convert("RGB").save(p, format="JPEG", quality=95)
        lines.append(f"{p}\t{caption}")
    tsv = out / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


if __name__ == "__main__":
    main()
