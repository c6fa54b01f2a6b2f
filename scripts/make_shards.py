#!/usr/bin/env python
"""Turn local images + captions into img2dataset-layout webdataset shards (+ *_stats.json and sizes.json).

Each sample holds .jpg (re-encoded, like img2dataset; --keep-format keeps the files' own bytes), .txt and .json
(source path, caption, size). An output folder that already holds shards is refused unless --overwrite, which
removes the old shards first.

Sources:
  --csv pairs.csv [--image-col image --caption-col caption]   one row per (image, caption); rows of the same
                                                                 image are merged into one sample (one caption per
                                                                 line, one picked at random per epoch in training)
  --coco captions_train2017.json --images /data/coco/train2017  a COCO-captions JSON

Examples:
  python scripts/make_shards.py --coco annotations/captions_train2017.json --images train2017 --out shards/coco
  python scripts/make_shards.py --csv pairs.csv --out shards/mine --per-shard 1000
Then: python train.py +experiment=clip_refine data.train_shards=shards/coco
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from alignkit.data.shards import write_shards

log = logging.getLogger("make_shards")


def from_csv(path: Path, image_col: str, caption_col: str) -> OrderedDict[Path, list[str]]:
    delim = "\t" if path.suffix in (".tsv", ".tab") else ","
    groups: OrderedDict[Path, list[str]] = OrderedDict()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim)
        for c in (image_col, caption_col):
            if c not in (reader.fieldnames or []):
                raise SystemExit(
                    f"{path}: no column {c!r} (columns: {reader.fieldnames}); use --image-col/--caption-col"
                )
        for row in reader:
            img = Path(row[image_col])
            img = img if img.is_absolute() else path.parent / img
            groups.setdefault(img, []).append(row[caption_col].strip())
    return groups


def from_coco(path: Path, images: Path) -> OrderedDict[Path, list[str]]:
    data = json.loads(path.read_text())
    if "images" not in data or "annotations" not in data:
        raise SystemExit(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    files = {im["id"]: images / im["file_name"] for im in data["images"]}
    groups: OrderedDict[Path, list[str]] = OrderedDict((files[i], []) for i in sorted(files))
    for ann in data["annotations"]:
        groups[files[ann["image_id"]]].append(ann["caption"].strip())
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path)
    src.add_argument("--coco", type=Path)
    p.add_argument("--images", type=Path, help="image folder for --coco")
    p.add_argument("--image-col", default="image")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the image order before sharding")
    p.add_argument(
        "--keep-format", action="store_true", help="store image files as they are (no JPEG re-encode)"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the re-encoded images")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.coco is not None and a.images is None:
        p.error("--coco needs --images (the folder holding the COCO images)")
    groups = from_csv(a.csv, a.image_col, a.caption_col) if a.csv else from_coco(a.coco, a.images)
    items = [(img, [c for c in caps if c]) for img, caps in groups.items()]
    missing = [img for img, _ in items if not img.is_file()]
    no_caption = [img for img, caps in items if not caps]
    if missing:
        log.warning("%d image(s) missing, skipped (first: %s)", len(missing), missing[0])
    if no_caption:
        log.warning("%d image(s) without caption, skipped (first: %s)", len(no_caption), no_caption[0])
    bad = set(missing) | set(no_caption)
    items = [(img, caps) for img, caps in items if img not in bad]
    if not items:
        raise SystemExit("no usable (image, caption) pairs")
    if a.shuffle_seed is not None:
        random.Random(a.shuffle_seed).shuffle(items)
    try:
        shards = write_shards(
            items,
            a.out,
            samples_per_shard=a.per_shard,
            keep_format=a.keep_format,
            quality=a.quality,
            overwrite=a.overwrite,
            total=len(items),
        )
    except FileExistsError as err:
        raise SystemExit(f"{err}") from err
    log.info(
        "wrote %d samples in %d shard(s) to %s (+ *_stats.json, sizes.json); skipped %d",
        len(items),
        len(shards),
        a.out,
        len(bad),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
