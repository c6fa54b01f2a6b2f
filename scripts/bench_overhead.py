"""Benchmarks 1 and 3: framework overhead against a bare PyTorch loop, and the teacher's cost in CLIP-Refine.

Every variant trains the same model from the same initial weights on the same in-memory batches (built once from
the synthetic pairs with the model's own preprocessing and tokenizer), fp32, AdamW. Variants are interleaved
(A, B, C, ... A, B, C, ...) so that load from other users of the machine hits them alike.

* ``alignkit/<loss>``: a real Lightning Trainer with the AlignModule, built from the composed config exactly as
  ``alignkit.run.train.train`` does (default callbacks: checkpointing, LR monitor, progress bar; CSV logger);
* ``bare/<loss>``: a hand-written loop in this file: same model, same loss maths written out, AdamW, nothing else;
* ``alignkit/clip_refine+cache``: the TeacherCache callback with every teacher embedding already in the cache
  (the state after ``scripts/precompute_teacher.py`` or an earlier run of a sweep);
* ``alignkit/clip_refine+bf16``: ``module.teacher_dtype=bfloat16``.

The time of a step is the wall time between consecutive step ends (data fetch, hooks, logging included).

    python scripts/bench_overhead.py [--model alignkit-small-vit --batch 64 --steps 30 --repeats 3 --memory]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time

import bench_common as bc
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from alignkit.callbacks.teacher_cache import TeacherCache
from alignkit.data.samples import PairTransform
from alignkit.data.synthetic import SyntheticShapes
from alignkit.data.webdataset import collate_pairs
from alignkit.features.teacher_store import TeacherEmbeddingStore
from alignkit.modules.base import no_weight_decay

VARIANTS = [
    "bare/contrastive",
    "alignkit/contrastive",
    "bare/clip_refine",
    "alignkit/clip_refine",
    "alignkit/clip_refine+cache",
    "alignkit/clip_refine+bf16",
]


def now() -> tuple[float, float]:
    """(wall, CPU time of this process). With one torch thread the CPU time of a step barely moves when other
    users' processes take the cores, where its wall time can double: both are reported."""
    return time.perf_counter(), time.process_time()


def deltas(ends: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(ends)]


class StepClock(Callback):
    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(now())


class PrefilledTeacherCache(TeacherCache):
    """The TeacherCache callback holding an already filled store (what a precompute pass leaves behind)."""

    def __init__(self, store: TeacherEmbeddingStore) -> None:
        super().__init__(root=None, save=False)
        self.prefilled = store

    def on_fit_start(self, trainer, pl_module) -> None:
        self.store = self.prefilled


def overrides(args, loss: str) -> list[str]:
    return [
        "encoder=tiny",
        f"encoder.model={args.model}",
        "data=synthetic",
        "trainer=cpu",
        f"loss={loss}",
        f"data.batch_size={args.batch}",
        f"data.num_samples={args.steps * args.batch}",  # one epoch = the args.steps batches fed below
        f"optimizer.lr={args.lr}",
    ]


def make_batches(args, encoder) -> list[dict]:
    size = encoder.module.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    ds = SyntheticShapes(
        PairTransform(encoder.preprocess_val, encoder.tokenizer), args.steps * args.batch, size
    )
    return [
        collate_pairs([ds[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(args.steps)
    ]


def lightning_run(
    args, loss: str, batches: list[dict], extra: list[str] = (), cache_store=None
) -> list[tuple[float, float]]:
    cfg = bc.compose(overrides(args, loss) + list(extra))
    clock = StepClock()
    cbs = [clock] + ([PrefilledTeacherCache(cache_store)] if cache_store is not None else [])
    torch.manual_seed(0)
    run = bc.build(cfg, len(batches), cbs)
    module, trainer = run.module, run.trainer
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    return deltas(clock.ends)


class BareLoop:
    """A hand-written training loop: what a user would write without a framework (same maths as alignkit's nodes)."""

    def __init__(self, args, loss: str) -> None:
        from alignkit.encoders.openclip import OpenCLIPEncoder

        torch.manual_seed(0)
        self.model = OpenCLIPEncoder(model=args.model, pretrained=None).module
        self.model.train()
        self.teacher = None
        if loss == "clip_refine":
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        named = list(self.model.named_parameters())
        self.opt = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if not no_weight_decay(n, p)]},
                {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
            ],
            lr=args.lr,
            weight_decay=0.1,
            foreach=True,  # what alignkit's optimizer.impl=auto picks on CPU: the same kernel on both sides
        )

    def step(self, b: dict, step: int) -> None:
        model, teacher = self.model, self.teacher
        img, tok = b["image"], b["text"]
        fi = model.encode_image(img, normalize=False)
        ft = model.encode_text(tok, normalize=False)
        labels = torch.arange(fi.shape[0])
        if teacher is None:  # symmetric InfoNCE, normalised features x the model's logit scale
            logits = model.logit_scale.exp() * F.normalize(fi, dim=-1) @ F.normalize(ft, dim=-1).T
            total = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        else:  # RaFA (shared N(0, I) references) + HyCD (alpha 0.5, T 1, raw features, forward KL)
            gen = torch.Generator().manual_seed(step)
            r = torch.randn(fi.shape, generator=gen)
            total = F.mse_loss(fi, r) + F.mse_loss(ft, r)
            with torch.no_grad():
                ti = teacher.encode_image(img, normalize=False)
                tt = teacher.encode_text(tok, normalize=False)
                eye = torch.eye(fi.shape[0])
                targets = [
                    0.5 * eye + 0.5 * F.softmax(ti @ tt.T, 1),
                    0.5 * eye + 0.5 * F.softmax(tt @ ti.T, 1),
                ]
            kd = 0.0
            for tgt, lp in zip(targets, [F.log_softmax(fi @ ft.T, 1), F.log_softmax(ft @ fi.T, 1)]):
                kd = kd + 0.5 * (torch.xlogy(tgt, tgt) - tgt * lp).sum(1).mean()
            total = total + kd
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()


def bare_run(args, loss: str, batches: list[dict]) -> list[tuple[float, float]]:
    loop = BareLoop(args, loss)
    ends = []
    for step, b in enumerate(batches):
        loop.step(b, step)
        ends.append(now())
    return deltas(ends)


class InterleavedBare(Callback):
    """Paired design: after every alignkit step, one bare step on the same batch in the same process.

    Each alignkit step is then timed from the end of the preceding bare step to its own end, and each bare step
    from its start to its end, so the two times of a pair are measured seconds apart under the same load, memory
    state and CPU frequency. On a shared machine this cancels most of the noise separate runs suffer from."""

    def __init__(self, args, loss: str, batches: list[dict]) -> None:
        self.loop, self.batches = BareLoop(args, loss), batches
        self.resumed: tuple[float, float] | None = None
        self.pairs: list[tuple[float, float]] = []  # (alignkit CPU s, bare CPU s) per step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.resumed is None:
            self.resumed = now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        end = now()
        ak = end[1] - self.resumed[1]
        self.loop.step(self.batches[batch_idx], batch_idx)
        self.resumed = now()
        self.pairs.append((ak, self.resumed[1] - end[1]))


def interleaved_run(args, loss: str, batches: list[dict], extra: list[str] = ()) -> list[tuple[float, float]]:
    cfg = bc.compose(overrides(args, loss) + list(extra))
    pair = InterleavedBare(args, loss, batches)
    torch.manual_seed(0)
    run = bc.build(cfg, len(batches), [pair])
    module, trainer = run.module, run.trainer
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)
    trainer.fit(module, train_dataloaders=loader)
    return pair.pairs


def run_variant(args, name: str, batches: list[dict], store) -> list[float]:
    kind, loss = name.split("/")
    if kind == "bare":
        return bare_run(args, loss, batches)
    if loss == "clip_refine+cache":
        return lightning_run(args, "clip_refine", batches, cache_store=store)
    if loss == "clip_refine+bf16":
        return lightning_run(args, "clip_refine", batches, ["module.teacher_dtype=bfloat16"])
    return lightning_run(args, loss, batches)


def fill_store(args, batches) -> TeacherEmbeddingStore:
    """The precompute pass (forward-only teacher over every sample); also timed, to say when the cache pays."""
    cfg = bc.compose(overrides(args, "clip_refine"))
    torch.manual_seed(0)
    module = bc.build(cfg, len(batches)).module
    store = TeacherEmbeddingStore("bench")
    t0 = time.perf_counter()
    for b in batches:
        store.outputs(module.teacher, b["image"], b["text"], b["key"])
    store.fill_seconds = time.perf_counter() - t0
    return store


def paired_report(args, batches: list[dict]) -> None:
    """Benchmark 1 with the step-interleaved design (:class:`InterleavedBare`), CPU time."""
    print(
        "\n1. framework overhead, step-interleaved (one bare step after every alignkit step, same process; CPU time):"
    )
    for loss in args.paired:
        pairs, per_rep = [], []
        for _ in range(args.repeats):
            got = interleaved_run(args, loss, batches)[args.warmup :]
            pairs += got
            per_rep.append(bc.stats([a for a, _ in got])["median"] / bc.stats([b for _, b in got])["median"])
        ak, bare = bc.stats([a for a, _ in pairs]), bc.stats([b for _, b in pairs])
        step_ratio = bc.stats([a / b for a, b in pairs])
        rep = bc.stats(per_rep)
        print(f"   {loss:12s} alignkit {bc.fmt(ak, ' ms', 1e3)}")
        print(f"   {'':12s} bare     {bc.fmt(bare, ' ms', 1e3)}")
        print(
            f"   {'':12s} alignkit / bare: {ak['median'] / bare['median']:.3f}x (ratio of medians, {len(pairs)} "
            f"pairs); per-pair ratio median {step_ratio['median']:.3f}x; per-repeat {rep['min']:.3f} / "
            f"{rep['median']:.3f} / {rep['max']:.3f}  target <= 1.05",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="alignkit-tiny-vit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--steps", type=int, default=30, help="steps per run (keep < 100: no checkpoint in the window)"
    )
    p.add_argument("--warmup", type=int, default=5, help="step times dropped at the start of each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="1: OpenMP threads spin badly on a shared, oversubscribed machine",
    )
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    p.add_argument(
        "--paired",
        nargs="*",
        default=["contrastive", "clip_refine"],
        choices=["contrastive", "clip_refine"],
        help="losses for the step-interleaved alignkit / bare comparison (the headline of benchmark 1)",
    )
    p.add_argument(
        "--memory", action="store_true", help="also peak RSS of each variant, each in a fresh process"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from alignkit.encoders.openclip import OpenCLIPEncoder

    enc = OpenCLIPEncoder(model=args.model, pretrained=None)
    batches = make_batches(args, enc)
    if args.child:
        store = fill_store(args, batches) if args.child.endswith("+cache") else None
        base = bc.current_rss_mb()
        bc.reset_peak_rss()
        run_variant(args, args.child, batches, store)
        print(json.dumps({"variant": args.child, "peak_rss_mb": bc.peak_rss_mb(), "rss_before_mb": base}))
        return
    bc.header("framework overhead and teacher cost (benchmarks 1 and 3)")
    print(
        f"   model {args.model}, batch {args.batch}, {args.steps} steps/run, {args.repeats} repeats, fp32, CPU"
    )
    store = fill_store(args, batches) if any(v.endswith("+cache") for v in args.variants) else None
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    per_rep: list[dict[str, float]] = []  # CPU-time median per variant per repeat, for paired ratios
    for rep in range(args.repeats):
        per_rep.append({})
        for v in args.variants:
            t = run_variant(args, v, batches, store)[args.warmup :]
            times[v] += t
            per_rep[-1][v] = bc.stats([x[1] for x in t])["median"]
            wall, cpu = bc.stats([x[0] for x in t]), bc.stats([x[1] for x in t])
            print(f"   repeat {rep}: {v:28s} median step {wall['median'] * 1e3:.1f} ms wall, "
                  f"{cpu['median'] * 1e3:.1f} ms CPU", flush=True)  # fmt: skip
    pairs = [
        ("1. overhead, contrastive", "alignkit/contrastive", "bare/contrastive", "target <= 1.05"),
        ("1. overhead, CLIP-Refine", "alignkit/clip_refine", "bare/clip_refine", "target <= 1.05"),
        ("3. teacher cost, live fp32", "alignkit/clip_refine", "alignkit/contrastive", "target <= 1.15"),
        ("3. teacher cost, cached", "alignkit/clip_refine+cache", "alignkit/contrastive", "target <= 1.15"),
        (
            "3. teacher cost, bf16 teacher",
            "alignkit/clip_refine+bf16",
            "alignkit/contrastive",
            "target <= 1.15",
        ),
        ("   bare teacher cost", "bare/clip_refine", "bare/contrastive", "(reference)"),
    ]
    s = {}
    for idx, kind in ((1, "CPU time of this process"), (0, "wall time")):
        s = {v: bc.stats([x[idx] for x in t]) for v, t in times.items()}
        print(f"\nseconds per optimizer step, {kind} (after warm-up, pooled over repeats):")
        for v in args.variants:
            print(f"   {v:28s} {bc.fmt(s[v], ' ms', 1e3)}")
        print(f"ratios ({kind}):")
        for label, a, b, target in pairs:
            if a in s and b in s:
                print(f"   {label:32s} {a} / {b}: {bc.ratio(s[a], s[b])}  {target}")
    print(
        "\npaired ratios (CPU time; ratio of medians within each repeat, then min / median / max over repeats):"
    )
    for label, a, b, target in pairs:
        if a in times and b in times:
            r = bc.stats([d[a] / d[b] for d in per_rep])
            print(f"   {label:32s} {r['min']:.3f} / {r['median']:.3f} / {r['max']:.3f}  {target}")
    if args.paired:
        paired_report(args, batches)
    if store is not None:
        per_step = store.fill_seconds / len(batches)
        print(
            f"\nprecompute pass (teacher forward only, inference mode): {per_step * 1e3:.1f} ms per batch "
            f"(= {per_step / s['alignkit/contrastive']['median']:.2f} contrastive steps)"
        )
    if args.memory:
        print("\npeak RSS per variant (fresh process each, same batches):")
        for v in args.variants:
            argv = [a for a in sys.argv[1:] if a != "--memory"]
            r = bc.child_peak_rss(__file__, [v, *argv])
            print(
                f"   {v:28s} peak {r['peak_rss_mb']:.0f} MiB during training (RSS at its start {r['rss_before_mb']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
