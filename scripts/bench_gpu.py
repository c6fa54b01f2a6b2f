"""GPU benchmark: ViT-B-32 CLIP-Refine at bf16 — samples/s, model FLOP utilisation, ratio to open_clip_train.

    python scripts/bench_gpu.py                       # on a GPU machine (random init: no weights offline)
    python scripts/bench_gpu.py --tiny --device cpu   # dry run of the same code path on CPU

0. a hand-written bf16 loop (``bench_bare.py``: same model, same loss object, fused AdamW, optionally compiled)
   at each ``--batches`` size, then alignkit on the same batches: the ratio alignkit / bare is printed;
1. alignkit CLIP-Refine and plain contrastive through the Lightning Trainer built as ``train.py`` builds it
   (``trainer.precision=bf16-mixed``), on device-resident synthetic batches (no data loading): samples/s;
2. FLOPs of one optimizer step counted with ``torch.utils.flop_counter.FlopCounterMode`` (student forward +
   backward, teacher forward; the count of what actually runs), MFU = FLOPs/s ÷ the card's dense bf16 peak;
3. the same contrastive job through ``open_clip_train`` (``--precision amp_bf16``) and through alignkit's
   ``train.py`` on the same webdataset shards and batch (``bench_peer.py``'s runners): ratio of samples/s.
Prints the card's name; record the result with it in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import bench_common as bc
import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by card name fragment; override with --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # fmt: skip


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overrides(args, loss: str) -> list[str]:
    return [
        "encoder=tiny" if args.tiny else "encoder=open_clip",
        f"encoder.model={args.model}",
        "encoder.pretrained=null",
        "data=synthetic",
        f"loss={loss}",
        f"data.batch_size={args.batch}",
        f"data.num_samples={args.steps * args.batch}",  # one epoch = the args.steps batches fed below
        f"trainer.accelerator={'cpu' if args.device == 'cpu' else 'gpu'}",
        f"trainer.precision={args.precision}",
        "trainer.log_every_n_steps=50",
        "callbacks.progress.refresh_rate=50",
        *(["module.compile.enabled=true"] if args.compile else []),
    ]


def device_batches(args, n: int, device: torch.device, image_size: int, ctx: int) -> list[dict]:
    """``n`` batches cycling over ``args.distinct`` resident ones: 40 distinct ViT-B-32 batches of 256 held 6 GiB
    of images on the device, which ``max_memory_allocated`` charged to alignkit (BENCHMARKS.md)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(min(n, args.distinct)):
        out.append(
            {
                "image": torch.randn(args.batch, 3, image_size, image_size, generator=g).to(device),
                "text": torch.randint(1, 49000, (args.batch, ctx), generator=g).to(device),
                "key": [f"{b}-{i}" for i in range(args.batch)],
                "skipped": torch.zeros(args.batch, dtype=torch.long),
                "worker": torch.zeros(args.batch, dtype=torch.long),
            }
        )
    return [out[i % len(out)] for i in range(n)]


class Clock(bc.StepTimesToFile):
    def __init__(self, device) -> None:
        super().__init__(path="")
        self.device = device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        pass


def step_flops(module, batch, device) -> float:
    """FLOPs of one training step's maths (student fwd + bwd, teacher fwd, loss) as actually dispatched."""
    from torch.utils.flop_counter import FlopCounterMode

    module.to(device).train()
    counter = FlopCounterMode(display=False)
    dtype = torch.bfloat16 if "bf16" in str(module.trainer_precision) else None
    with counter, torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = module(batch["image"], batch["text"])
        if module.teacher is not None:
            out.update(module.teacher_forward(batch["image"], batch["text"]))
        out["step"] = 0
        module.loss(out)["loss"].backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure_alignkit(args, loss: str, device: torch.device) -> dict:
    cfg = bc.compose(overrides(args, loss))
    clock = Clock(device)
    torch.manual_seed(0)
    run = bc.build(cfg, args.steps, [clock])
    encoder, module, trainer = run.encoder, run.module, run.trainer
    size = encoder.module.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    ctx = encoder.module.context_length
    batches = device_batches(args, args.steps, device, size, ctx)
    module.trainer_precision = args.precision
    bare = None
    if args.bare:
        import bench_bare

        bare = bench_bare.measure_bare(
            cfg, batches, args.steps - args.warmup, args.warmup, device, args.compile
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = step_flops(module, batches[0], device)
    # after the FLOP count: its step (and the bare loop) must not count as alignkit's peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        bc.reset_peak_rss()
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    steps = [b - a for a, b in itertools.pairwise(clock.ends)][args.warmup :]
    step_s = statistics.median(steps)
    mem = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else bc.peak_rss_mb() / 1024
    )
    return {"step_s": step_s, "samples_s": args.batch / step_s, "flops": flops, "mem_gib": mem, "bare": bare}


def report(args, loss: str, r: dict, peak: float | None) -> None:
    mfu = lambda s: f", MFU {r['flops'] / s / (peak * 1e12):.1%}" if peak else ""  # noqa: E731
    b = r["bare"]
    if b is not None:
        print(f"   bare     {loss:12s} batch {args.batch}: {b['samples_s']:.1f} samples/s{mfu(b['step_s'])}, "
              f"peak mem {b['mem_gib']:.2f} GiB" + (" (compiled)" if args.compile else ""))  # fmt: skip
    print(f"   alignkit {loss:12s} batch {args.batch}: {r['samples_s']:.1f} samples/s, {r['flops'] / 1e9:.2f} "
          f"GFLOP/step, {r['flops'] / r['step_s'] / 1e12:.2f} TFLOP/s{mfu(r['step_s'])}, "
          f"peak mem {r['mem_gib']:.2f} GiB", flush=True)  # fmt: skip
    if b is not None:
        print(f"   ratio alignkit / bare {loss} batch {args.batch}: {r['samples_s'] / b['samples_s']:.3f}x "
              f"samples/s, {r['mem_gib'] / b['mem_gib']:.3f}x peak memory", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--tiny", action="store_true", help="alignkit-tiny-vit (CPU dry run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="256,1024", help="per-device batch sizes, comma-separated")
    p.add_argument("--distinct", type=int, default=2, help="distinct device-resident batches cycled over")
    p.add_argument(
        "--bare", action=argparse.BooleanOptionalAction, default=True, help="the bare-loop reference"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the towers (bare loop and alignkit's module.compile)",
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also open_clip_train")
    p.add_argument("--peer-samples", type=int, default=16384)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args()
    if args.tiny:
        args.model = "alignkit-tiny-vit"
    device = torch.device(args.device)
    bc.header("GPU benchmark: CLIP-Refine at bf16")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    peak = peak_tflops(device, args.peak_tflops)
    sizes = [int(b) for b in args.batches.split(",")]
    print(f"   card: {card}; model {args.model}; per-device batches {sizes}; precision {args.precision}")
    for args.batch in sizes:
        res = {}
        for loss in ("contrastive", "clip_refine"):
            r = res[loss] = measure_alignkit(args, loss, device)
            report(args, loss, r, peak)
        print(f"   teacher cost (CLIP-Refine / contrastive step time): "
              f"{res['clip_refine']['step_s'] / res['contrastive']['step_s']:.3f}x")  # fmt: skip
    args.batch = sizes[0]
    if args.peer:
        import bench_peer as bp

        from alignkit.data.shards import write_shards
        from alignkit.data.synthetic import SyntheticShapes

        tmp = Path(tempfile.mkdtemp(prefix="alignkit-gpu-peer-"))
        ds = SyntheticShapes(None, args.peer_samples, 256, 0)
        paths = write_shards((ds.item(i) for i in range(args.peer_samples)), tmp / "shards", 512)
        pa = argparse.Namespace(
            model=args.model, samples=args.peer_samples, batch=args.batch, workers=args.workers,
            threads=8, lr=1e-5, window=5, warmup_windows=1,
        )  # fmt: skip
        tsv = bp.write_tsv(ds, tmp / "files")  # open_clip_train 3.3 cannot read webdataset 1.x shards
        t0 = time.perf_counter()
        kw = dict(gpu=device.type == "cuda", precision=args.precision)
        oc_prec = "amp_bf16" if "bf16" in args.precision else "fp32"
        runs = {
            "alignkit train.py, webdataset": lambda d: bp.run_alignkit(pa, tmp / "shards", d, **kw),
            "alignkit train.py, csv": lambda d: bp.run_alignkit(pa, tmp / "shards", d, tsv=tsv, **kw),
            "open_clip_train, csv": lambda d: bp.run_open_clip(
                pa, tmp / "shards", len(paths), d, device=args.device, precision=oc_prec, tsv=tsv
            ),
        }
        rates = {}
        for name, fn in runs.items():
            try:
                r = fn(Path(tempfile.mkdtemp(dir=tmp)))
                rates[name] = args.batch / statistics.median(r["window_s"])
                print(f"   {name}: {rates[name]:.1f} samples/s (contrastive, same pairs, batch {args.batch})")
            except RuntimeError as err:
                print(f"   {name}: failed ({str(err).splitlines()[-1]})")
        if "open_clip_train, csv" in rates:
            for name in ("alignkit train.py, webdataset", "alignkit train.py, csv"):
                if name in rates:
                    print(
                        f"   ratio {name} / open_clip_train csv: {rates[name] / rates['open_clip_train, csv']:.3f}x"
                    )
        print(f"   ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
