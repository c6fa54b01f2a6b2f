"""Reproduce CLIP-Refine and STRUCTURE: offline on real small models, or the paper-scale recipes.

    alignkit reproduce offline --out outputs/reproduce          # = make reproduce (~30 min, 2 CPU cores)
    alignkit reproduce offline --out /tmp/r --scale tiny         # the test suite's reduced version
    alignkit reproduce clip_refine_coco --coco-shards /data/coco --evalsets /data/clip_benchmark --out DIR
    alignkit reproduce structure_coco --coco-shards /data/coco2014 --evalsets /data/clip_benchmark --out DIR
    alignkit reproduce clip_refine_coco --dry-run --out /tmp/d   # the whole recipe on the shipped tiny model

``offline`` writes DIR/results.json, DIR/results.md and DIR/results.png (see README "Reproduction").
"""

from __future__ import annotations

import argparse
import logging
import os


def _say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None, prog: str = "alignkit reproduce") -> int:
    # offline by default: the encoders and data of the offline table install as packages, nothing is downloaded
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WANDB_MODE", "offline"),
                 ("TOKENIZERS_PARALLELISM", "false")):  # fmt: skip
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    off = sub.add_parser("offline", help="the offline replication table (real small encoders and data)")
    off.add_argument("--out", required=True)
    off.add_argument("--scale", default="full", choices=["full", "tiny"])
    off.add_argument(
        "--data-root", default=None, help="where the splits are built (default data/offline_repro[_tiny])"
    )
    off.add_argument("--cache-dir", default=os.environ.get("ALIGNKIT_CACHE", ".cache/alignkit"))
    off.add_argument("--parts", default="A,B", help="A, B or A,B")
    off.add_argument("--rows", default=None, help="only these rows (comma-separated names)")
    off.add_argument(
        "--b-lrs", default=None, help="Part B learning-rate grid (comma-separated; default: the scale's)"
    )
    off.add_argument(
        "--only-finished",
        action="store_true",
        help="train nothing: the table of the runs already finished in DIR",
    )
    off.add_argument("--merge", action="store_true", help="add the rows to an existing DIR/results.json")
    off.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy machine)"
    )
    for name in ("clip_refine_coco", "structure_coco"):
        c = sub.add_parser(name, help=f"the paper-scale {name} recipe (GPU, weights, COCO)")
        c.add_argument("--out", required=True)
        c.add_argument("--coco-shards", default=None, help="COCO caption shards (alignkit make-shards)")
        c.add_argument("--evalsets", default=None, help="a folder of CLIP_benchmark webdataset eval sets")
        c.add_argument(
            "--dry-run", action="store_true", help="run the whole recipe on the shipped tiny model"
        )
        c.add_argument(
            "--baselines", action="store_true", help="also the paper's baselines (clip_refine_coco)"
        )
        c.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training run")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.cmd == "offline":
        from alignkit.run.reproduce.offline import SCALES, run_offline
        from alignkit.run.reproduce.rows import rows_for

        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        parts = {s.strip() for s in a.parts.split(",")}
        rows = {k: r for k, r in rows_for(SCALES[a.scale].low_n).items() if r.part in parts}
        if a.rows:
            wanted = [n.strip() for n in a.rows.split(",")]
            unknown = sorted(set(wanted) - set(rows))
            if unknown:
                raise SystemExit(f"--rows: unknown rows {unknown}; known: {sorted(rows)}")
            rows = {k: r for k, r in rows.items() if k in wanted}
        root = a.data_root or ("data/offline_repro" + ("_tiny" if a.scale == "tiny" else ""))
        scale = SCALES[a.scale]
        if a.b_lrs:
            from dataclasses import replace

            scale = replace(scale, b_lrs=tuple(float(x) for x in a.b_lrs.split(",")))
        run_offline(
            a.out, scale, root, a.cache_dir, rows, say=_say, merge=a.merge, only_finished=a.only_finished
        )
        return 0
    from alignkit.run.reproduce.recipes import run_recipe

    run_recipe(a.cmd, a.out, a.coco_shards, a.evalsets, a.dry_run, a.overrides, a.baselines, say=_say)
    return 0
