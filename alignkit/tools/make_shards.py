"""alignkit make-shards: local images + captions -> img2dataset-layout webdataset shards.

Each sample holds .jpg (re-encoded, like img2dataset; --keep-format keeps the files' own bytes), .txt and .json
(source path, caption, size); each shard NNNNN.tar comes with NNNNN_stats.json and NNNNN.parquet (one row per
input, failed ones included), and the folder with sizes.json. A missing or unreadable image counts as
failed_to_download, one that does not decode as failed_to_decode: both are named in a rate-limited warning and the
run carries on. An output folder that already holds shards is refused unless --overwrite, which removes the old
shards first.

Sources:
  --csv pairs.csv [--image-col image --caption-col caption]   one row per (image, caption); rows of the same
                                                                 image are merged into one sample (one caption per
                                                                 line, one picked at random per epoch in training)
  --coco captions_train2017.json --images /data/coco/train2017  a COCO-captions JSON

Examples:
  alignkit make-shards --coco annotations/captions_train2017.json --images train2017 --out shards/coco
  alignkit make-shards --csv pairs.csv --out shards/mine --per-shard 1000
Then: alignkit train +experiment=clip_refine data.train_shards=shards/coco
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
from collections import OrderedDict
from pathlib import Path

from alignkit.data.shards import FailureLog, write_shards

log = logging.getLogger("make_shards")


def from_csv(path: Path, image_col: str, caption_col: str) -> OrderedDict[Path, list[str]]:
    """{image path: captions} from a CSV/TSV; relative image paths are relative to the CSV's folder."""
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
    """{image path: captions} from a COCO captions JSON, in image-id order."""
    data = json.loads(path.read_text())
    if "images" not in data or "annotations" not in data:
        raise SystemExit(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    files = {im["id"]: images / im["file_name"] for im in data["images"]}
    groups: OrderedDict[Path, list[str]] = OrderedDict((files[i], []) for i in sorted(files))
    for ann in data["annotations"]:
        groups[files[ann["image_id"]]].append(ann["caption"].strip())
    return groups


def parser(prog: str = "alignkit make-shards") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    return p


def main(argv: list[str] | None = None, prog: str = "alignkit make-shards") -> int:
    p = parser(prog)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.coco is not None and a.images is None:
        p.error("--coco needs --images (the folder holding the COCO images)")
    groups = from_csv(a.csv, a.image_col, a.caption_col) if a.csv else from_coco(a.coco, a.images)
    items = [(img, [c for c in caps if c]) for img, caps in groups.items()]
    no_caption = [img for img, caps in items if not caps]
    if no_caption:
        log.warning("%d image(s) without caption, skipped (first: %s)", len(no_caption), no_caption[0])
    items = [(img, caps) for img, caps in items if caps]
    if not items:
        raise SystemExit("no (image, caption) pairs with a caption")
    if a.shuffle_seed is not None:
        random.Random(a.shuffle_seed).shuffle(items)
    failures = FailureLog()
    try:
        shards = write_shards(
            items,
            a.out,
            samples_per_shard=a.per_shard,
            keep_format=a.keep_format,
            quality=a.quality,
            overwrite=a.overwrite,
            total=len(items),
            failures=failures,
        )
    except FileExistsError as err:
        raise SystemExit(f"{err}") from err
    failed = sum(failures.counts.values())
    if failed:
        log.warning(
            "%d image(s) failed and were left out (%s; first: %s); see the shards' *_stats.json and *.parquet",
            failed,
            ", ".join(f"{k}: {v}" for k, v in sorted(failures.counts.items())),
            failures.first_source,
        )
    log.info(
        "wrote %d samples in %d shard(s) to %s (+ *_stats.json, *.parquet, sizes.json)",
        len(items) - failed,
        len(shards),
        a.out,
    )
    return 0
