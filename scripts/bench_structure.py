"""Benchmarks 4 and 6 (frozen-encoder alignment): feature extraction through FeatureCache vs the raw encoder
forward, an epoch of head training on cached features vs with the encoders in the loop, layer selection over all
pairs vs a per-pair loop, and R_S at batch 4,096 with L = 1, 3 (time and peak RSS, each in a fresh process).

Real offline encoders: EfficientNet-Lite0 (ImageNet weights, 224 px) and all-MiniLM-L6-v2; synthetic image-caption
pairs. Variants are interleaved over repeats. Times are CPU time of this (single-threaded) process: on a machine
shared with other users' jobs, wall time of the same work varies by 2x, CPU time by a few percent.

    python scripts/bench_structure.py [--n 96 --batch 32 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid

import bench_common as bc
import torch

from alignkit.encoders.heads import LinearHead
from alignkit.encoders.offline import efficientnet_lite0_tower, efficientnet_lite0_transform, load_minilm
from alignkit.features.cache import FeatureCache, encode_batches, feature_key
from alignkit.features.similarity import layer_similarity_matrix, mutual_knn
from alignkit.losses.structure import StructureLoss, structure_regularizer


def rs_child(batch: int, levels: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 384)
    a = torch.randn(batch, 512, requires_grad=True)
    base = bc.current_rss_mb()
    bc.reset_peak_rss()
    t0 = time.process_time()
    structure_regularizer(x, a, levels=levels).backward()
    dt = time.process_time() - t0
    print(json.dumps({"seconds": dt, "peak_rss_mb": bc.peak_rss_mb(), "rss_before_mb": base}))


def train_epoch(heads, loss_fn, opt, feats_iter) -> None:
    for step, (xi, xt) in enumerate(feats_iter):
        out = {"image_features": heads[0](xi), "text_features": heads[1](xt), "image_inputs": xi,
               "text_inputs": xt, "step": step}  # fmt: skip
        loss = loss_fn(out)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="pairs to encode")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--select-n", type=int, default=1000, help="rows scored by layer selection")
    p.add_argument("--child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return rs_child(*args.child)
    bc.header("frozen-encoder alignment (benchmarks 4 and 6)")
    from alignkit.data.synthetic import SyntheticShapes

    vis, txt = efficientnet_lite0_tower(), load_minilm()
    pre = efficientnet_lite0_transform()
    ds = SyntheticShapes(None, args.n, 224, 0)
    pairs = [ds.item(i) for i in range(args.n)]
    img_batches = [
        torch.stack([pre(im) for im, _ in pairs[s : s + args.batch]]) for s in range(0, args.n, args.batch)
    ]
    cap_batches = [[c for _, c in pairs[s : s + args.batch]] for s in range(0, args.n, args.batch)]
    li, lt = list(range(vis.num_layers)), list(range(txt.num_layers))
    print(
        f"   {args.n} pairs, batch {args.batch}; EfficientNet-Lite0 {len(li)} layers, MiniLM {len(lt)} layers"
    )
    root = tempfile.mkdtemp(prefix="alignkit-fc-")
    cache = FeatureCache(root, progress=False)
    t = {"raw forward": [], "FeatureCache": []}
    entries = {}
    for _ in range(args.repeats):
        t0 = time.process_time()
        with torch.no_grad():
            for b in img_batches:
                vis.forward_layers(b, li)
            for c in cap_batches:
                txt.forward_layers(c, lt)
        t["raw forward"].append(args.n / (time.process_time() - t0))
        t0 = time.process_time()
        for tower, batches, layers in ((vis, img_batches, li), (txt, cap_batches, lt)):
            key = feature_key(encoder=type(tower).__name__, weights="bench", layers=layers, pooling="default",
                              preprocessing="bench", dataset=uuid.uuid4().hex)  # fmt: skip  # a miss every time
            got = cache.get_or_compute(
                key, lambda t=tower, b=batches, ly=layers: encode_batches(t, b, ly), num_items=args.n
            )
            entries[tower is txt] = got
        t["FeatureCache"].append(args.n / (time.process_time() - t0))
    s = {k: bc.stats(v) for k, v in t.items()}
    print("\n4a. feature extraction, all layers of both towers (pairs per CPU second):")
    for k, v in s.items():
        print(f"   {k:14s} {bc.fmt(v, ' pairs/s')}")
    print(f"   ratio FeatureCache / raw: {s['FeatureCache']['median'] / s['raw forward']['median']:.3f}x (median)"
          f"   target >= 0.9")  # fmt: skip

    xi_all = torch.from_numpy(entries[False][li[-1]][:]).float()
    xt_all = torch.from_numpy(entries[True][lt[-1]][:]).float()
    ep = {"cached features": [], "encoders in the loop": []}
    for _ in range(args.repeats):
        for mode in ep:
            torch.manual_seed(0)
            heads = [LinearHead(xi_all.shape[1], 256), LinearHead(xt_all.shape[1], 256)]
            opt = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=1e-3)
            loss_fn = StructureLoss(warmup_steps=0)
            if mode == "cached features":
                feats = (
                    (xi_all[i : i + args.batch], xt_all[i : i + args.batch])
                    for i in range(0, args.n, args.batch)
                )
            else:

                def feats():
                    for b, c in zip(img_batches, cap_batches):
                        with torch.no_grad():  # left before the yield: the caller's step needs grad mode
                            xi = vis.forward_layers(b, [li[-1]])[li[-1]]
                            xt = txt.forward_layers(c, [lt[-1]])[lt[-1]]
                        yield xi, xt

                feats = feats()
            t0 = time.process_time()
            train_epoch(heads, loss_fn, opt, feats)
            ep[mode].append(time.process_time() - t0)
    s = {k: bc.stats(v) for k, v in ep.items()}
    print(f"\n4b. one epoch of linear-head STRUCTURE training over {args.n} pairs (CPU seconds):")
    for k, v in s.items():
        print(f"   {k:22s} {bc.fmt(v, ' s')}")
    print(f"   speed-up of cached features: {s['encoders in the loop']['median'] / s['cached features']['median']:.0f}x"
          f" (median)   target >= 50x")  # fmt: skip

    g = torch.Generator().manual_seed(0)
    fa = [torch.randn(args.select_n, d, generator=g) for d in (16, 24, 40, 80, 112, 192, 320, 1280)]
    fb = [torch.randn(args.select_n, 384, generator=g) for _ in range(7)]
    sel = {"all pairs (layer_similarity_matrix)": [], "per-pair loop (mutual_knn)": []}
    for _ in range(args.repeats):
        t0 = time.process_time()
        m1 = layer_similarity_matrix(fa, fb, "mutual_knn")
        sel["all pairs (layer_similarity_matrix)"].append(time.process_time() - t0)
        t0 = time.process_time()
        m2 = torch.tensor([[mutual_knn(a, b) for b in fb] for a in fa], dtype=torch.float64)
        sel["per-pair loop (mutual_knn)"].append(time.process_time() - t0)
    assert torch.allclose(m1, m2)
    s = {k: bc.stats(v) for k, v in sel.items()}
    print(
        f"\n4c. layer selection, 8 x 7 layer pairs, mutual kNN on {args.select_n} rows (seconds; same scores):"
    )
    for k, v in s.items():
        print(f"   {k:36s} {bc.fmt(v, ' s')}")
    a, b = s["per-pair loop (mutual_knn)"], s["all pairs (layer_similarity_matrix)"]
    print(f"   speed-up: {a['median'] / b['median']:.1f}x (median)")
    print(f"\n   peak RSS of this process (towers, features, selection): {bc.peak_rss_mb():.0f} MiB")

    print(
        "\n6. R_S (STRUCTURE regulariser) forward + backward at batch 4,096, D=384 -> d=512, fresh process each:"
    )
    for levels in (1, 3):
        r = bc.child_peak_rss(__file__, ["4096", str(levels)])
        print(f"   L={levels}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
              f"(+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MiB over the inputs)")  # fmt: skip


if __name__ == "__main__":
    main()
