#!/usr/bin/env python
"""Build the offline demo pairs + eval sets used by ``+experiment=structure_offline`` (it also builds them on
first use):

    python scripts/build_offline_pairs.py --root data/structure_offline [--fashion-train 4000 --clipart-train 3000]

Needs ``apt-get install -y dataset-fashion-mnist openclipart-png``. See alignkit/data/offline_pairs.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from alignkit.data.offline_pairs import ensure_offline_pairs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/structure_offline")
    p.add_argument("--fashion-train", type=int, default=4000)
    p.add_argument("--clipart-train", type=int, default=3000)
    p.add_argument("--fashion-test", type=int, default=2000)
    p.add_argument("--clipart-test", type=int, default=1000)
    p.add_argument("--fashion-val", type=int, default=1000)
    p.add_argument("--clipart-val", type=int, default=500)
    p.add_argument("--holdout", nargs="*", default=["bag", "ankle boot"])
    p.add_argument("--max-side", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_offline_pairs(
        a.root, a.fashion_train, a.clipart_train, a.fashion_test, a.clipart_test, a.holdout,
        max_side=a.max_side, seed=a.seed, fashion_val=a.fashion_val, clipart_val=a.clipart_val,
    )  # fmt: skip
    print(root)


if __name__ == "__main__":
    main()
