"""Build zero-shot / retrieval eval sets from data that installs offline, in CLIP_benchmark's wds layout.

    alignkit build-evalsets fashion-mnist --out data/evalsets [--limit 2000 --seed 0]
    alignkit build-evalsets digits        --out data/evalsets [--limit N]
    alignkit build-evalsets openclipart   --out data/evalsets --limit 1000 --seed 0

Each writes ``<out>/<name>/test/{0..n-1}.tar`` + ``test/nshards.txt`` (at least 4 shards, so CLIP_benchmark's
default ``--num_workers`` each read one) and, at ``<out>/<name>/``,
``dataset_type.txt`` plus ``classnames.txt`` / ``zeroshot_classification_templates.txt`` (classification)
or ``members.txt`` (retrieval: the source files used, so training data can exclude them).
Sources: Debian ``dataset-fashion-mnist`` and ``openclipart-png`` (``apt-get install -y dataset-fashion-mnist
openclipart-png``) and scikit-learn's bundled digits.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from alignkit.data.evalsets import EvalSetError, write_eval_shards
from alignkit.data.offline_pairs import (
    EVAL_TEMPLATES,
    FASHION_CLASSES,
    FASHION_DIR,
    OPENCLIPART_DIR,
    clipart_captions,
    png_bytes,
    read_idx,
)
from alignkit.data.samples import to_rgb

log = logging.getLogger("build_evalsets")

FASHION_TEMPLATES = EVAL_TEMPLATES
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the number {c}.",
    "a handwritten digit {c}.",
    "a blurry image of the digit {c}.",
]


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Deterministic subset of range(n) (all when limit is None), returned in ascending order."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _prepare(root: Path, overwrite: bool) -> Path:
    if root.exists():
        if not overwrite:
            sys.exit(f"error: {root} exists; pass --overwrite to replace it")
        shutil.rmtree(root)
    (root / "test").mkdir(parents=True)
    return root


def _write_shards(root: Path, samples: Iterable[dict], shard_size: int) -> int:
    try:
        return write_eval_shards(root / "test", tqdm(samples, desc=f"{root.name}", unit="img"), shard_size)
    except EvalSetError as e:
        sys.exit(f"error: {e}")


def _write_classification(root: Path, classes: list[str], templates: list[str]) -> None:
    (root / "dataset_type.txt").write_text("classification\n")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


def build_fashion_mnist(args: argparse.Namespace) -> None:
    src = Path(args.source or FASHION_DIR)
    img_f, lab_f = src / "t10k-images-idx3-ubyte.gz", src / "t10k-labels-idx1-ubyte.gz"
    for f in (img_f, lab_f):
        if not f.is_file():
            sys.exit(
                f"error: {f} not found. Install it with 'apt-get install -y dataset-fashion-mnist' "
                "or pass --source DIR holding t10k-*-ubyte.gz."
            )
    images, labels = read_idx(img_f), read_idx(lab_f)
    root = _prepare(Path(args.out) / args.name, args.overwrite)
    idx = _subset(len(labels), args.limit, args.seed)
    samples = (
        {
            "__key__": f"{i:05d}",
            "png": png_bytes(Image.fromarray(images[i], "L")),
            "cls": str(int(labels[i])).encode(),
        }
        for i in idx
    )
    n = _write_shards(root, samples, args.shard_size)
    _write_classification(root, FASHION_CLASSES, FASHION_TEMPLATES)
    log.info("fashion-mnist: wrote %d test images to %s", n, root)


def build_digits(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 values in 0..16 (ink intensity, dark background) -> 0..255 grey levels.
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    root = _prepare(Path(args.out) / args.name, args.overwrite)
    idx = _subset(len(images), args.limit, args.seed)
    samples = (
        {
            "__key__": f"{i:05d}",
            "png": png_bytes(Image.fromarray(images[i], "L")),
            "cls": str(int(digits.target[i])).encode(),
        }
        for i in idx
    )
    n = _write_shards(root, samples, args.shard_size)
    _write_classification(root, DIGIT_CLASSES, DIGIT_TEMPLATES)
    log.info("digits: wrote %d images to %s", n, root)


def build_openclipart(args: argparse.Namespace) -> None:
    src = Path(args.source or OPENCLIPART_DIR)
    files = sorted(src.rglob("*.png")) if src.is_dir() else []
    if not files:
        sys.exit(
            f"error: no PNG files under {src}. Install with 'apt-get install -y openclipart-png' or pass --source."
        )
    # One image per distinct caption set: files like x_01.png / x_02.png would give identical captions
    # to different gallery images, which makes retrieval ambiguous.
    by_caption: dict[tuple[str, ...], Path] = {}
    no_words = 0
    for f in files:
        caps = tuple(clipart_captions(f.relative_to(src)))
        if not caps:
            no_words += 1
            continue
        by_caption.setdefault(caps, f)
    candidates = sorted(by_caption.values())
    log.info(
        "openclipart: %d files, %d without name words, %d duplicate captions dropped, %d candidates",
        len(files), no_words, len(files) - no_words - len(candidates), len(candidates),
    )  # fmt: skip
    order = list(range(len(candidates)))
    random.Random(args.seed).shuffle(order)
    limit = args.limit or len(candidates)
    chosen: list[tuple[Path, bytes]] = []
    huge = broken = 0
    for i in order:
        if len(chosen) >= limit:
            break
        f = candidates[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    if im.width * im.height > args.max_pixels:
                        huge += 1
                        continue
                    rgb = to_rgb(im)
        except Image.DecompressionBombError:
            huge += 1
            continue
        except OSError as e:
            broken += 1
            log.warning("openclipart: skipping unreadable %s (%s)", f, e)
            continue
        rgb.thumbnail((args.max_side, args.max_side), Image.Resampling.BICUBIC)
        chosen.append((f, png_bytes(rgb)))
    if huge:
        log.info("openclipart: skipped %d images over %d pixels", huge, args.max_pixels)
    chosen.sort()
    root = _prepare(Path(args.out) / args.name, args.overwrite)
    samples = (
        {"__key__": f"{k:05d}", "png": data, "txt": "\n".join(clipart_captions(f.relative_to(src))).encode()}
        for k, (f, data) in enumerate(chosen)
    )
    n = _write_shards(root, samples, args.shard_size)
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "members.txt").write_text("".join(f"{f.relative_to(src)}\n" for f, _ in chosen))
    log.info("openclipart: wrote %d images (%d huge, %d unreadable skipped) to %s", n, huge, broken, root)


def main(argv: list[str] | None = None, prog: str = "alignkit build-evalsets") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="which", required=True)
    builders = {
        "fashion-mnist": build_fashion_mnist,
        "digits": build_digits,
        "openclipart": build_openclipart,
    }
    names = {"fashion-mnist": "fashion_mnist", "digits": "digits", "openclipart": "openclipart"}
    for which in builders:
        p = sub.add_parser(which)
        p.add_argument("--out", required=True, help="parent directory; the set goes to OUT/NAME")
        p.add_argument("--name", default=names[which])
        p.add_argument("--limit", type=int, default=None, help="deterministic subset of this many images")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shard-size", type=int, default=1000, help="samples per .tar shard")
        p.add_argument("--overwrite", action="store_true")
        if which != "digits":
            p.add_argument("--source", default=None, help="source directory (default: the Debian path)")
        if which == "openclipart":
            p.add_argument("--max-pixels", type=int, default=20_000_000, help="skip larger images")
            p.add_argument("--max-side", type=int, default=256, help="downscale longer side to this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    builders[args.which](args)
