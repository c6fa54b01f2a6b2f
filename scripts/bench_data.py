"""Benchmark 5: samples/s of the webdataset training pipeline for 1, 2, 4 workers, and whether it keeps up.

Shards of synthetic 256 px JPEG pairs (written with ``alignkit.data.shards.write_shards``) read through
``ImageTextDataModule(source=webdataset)`` — decode, the model's eval preprocess, tokenise, batch — at the tiny
model's 32 px input and at ViT-B-32's 224 px. "Keeps up" compares with a bare fp32 training step of the tiny model
on the same batch size, timed in the same run.

    python scripts/bench_data.py [--samples 1024 --batch 32 --repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import bench_common as bc
import open_clip
import torch
import torch.nn.functional as F

from alignkit.data import ImageTextDataModule
from alignkit.data.shards import write_shards
from alignkit.data.synthetic import SyntheticShapes
from alignkit.encoders.openclip import OpenCLIPEncoder


def loader_rate(shards: Path, pre, tok, batch: int, workers: int) -> float:
    dm = ImageTextDataModule(source="webdataset", train_shards=str(shards), batch_size=batch, num_workers=workers,
                             pin_memory=False)  # fmt: skip
    dm.attach(pre, pre, tok)
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first batch out
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - t0)


def step_rate(enc: OpenCLIPEncoder, batch: int, steps: int = 8) -> float:
    m = enc.module
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(1, 49000, (batch, 16))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fi, ft = F.normalize(m.encode_image(x), dim=-1), F.normalize(m.encode_text(t), dim=-1)
        logits = m.logit_scale.exp() * fi @ ft.T
        labels = torch.arange(batch)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch / sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bc.header("webdataset pipeline throughput (benchmark 5)")
    tmp = Path(tempfile.mkdtemp(prefix="alignkit-data-"))
    ds = SyntheticShapes(None, args.samples, 256, 0)
    write_shards((ds.item(i) for i in range(args.samples)), tmp, samples_per_shard=args.samples // 8)
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)
    pres = {
        "32px (tiny)": enc.preprocess_val,
        "224px (ViT-B-32)": open_clip.image_transform(224, is_train=False),
    }
    print(f"   {args.samples} pairs, 256 px JPEG, 8 shards, batch {args.batch}")
    rates: dict[str, list[float]] = {}
    steps: list[float] = []
    for _ in range(args.repeats):
        steps.append(step_rate(enc, args.batch))
        for name, pre in pres.items():
            for w in args.workers:
                r = loader_rate(tmp, pre, enc.tokenizer, args.batch, w)
                rates.setdefault(f"{name}, {w} worker(s)", []).append(r)
    s_step = bc.stats(steps)
    print(f"\n   bare tiny-model training step, batch {args.batch}: {bc.fmt(s_step, ' samples/s')}")
    for k, v in rates.items():
        s = bc.stats(v)
        keeps = "keeps up" if s["median"] >= s_step["median"] else "does NOT keep up"
        print(
            f"   {k:28s} {bc.fmt(s, ' samples/s')}  -> {s['median'] / s_step['median']:.2f}x the step rate, {keeps}"
        )
    print(f"\n   peak RSS of the main process: {bc.peak_rss_mb():.0f} MiB (workers are separate processes)")


if __name__ == "__main__":
    main()
