"""Real image-caption pairs and eval sets from data that installs offline (the ``structure_offline`` demo).

Sources (``apt-get install -y dataset-fashion-mnist openclipart-png``):

* Fashion-MNIST *train* images of every class except ``holdout`` (default: bag, ankle boot), each with two
  templated captions ("a photo of a pullover.", ...) → training pairs;
* Fashion-MNIST *test* (all 10 classes) → zero-shot eval set (CLIP_benchmark wds layout);
* openclipart PNGs with captions from their file names and category folders; a seeded split gives disjoint
  held-out (retrieval eval set) and training images;
* a validation split for choosing recipes (never the eval sets): Fashion-MNIST *train* images of all 10 classes
  that are not training images, and clip art used nowhere else (no pixel copy of a training or test picture).

:func:`ensure_offline_pairs` writes ``root/train/*.tar`` (+ ``sizes.json``), ``root/eval/fashion_mnist``,
``root/eval/openclipart``, ``root/val/fashion_mnist``, ``root/val/openclipart`` and a ``manifest.json`` of the
parameters; a second call with the same parameters
returns at once, different parameters rebuild. Building goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from alignkit.data.evalsets import write_eval_shards
from alignkit.data.samples import to_rgb
from alignkit.data.shards import write_tars

log = logging.getLogger(__name__)

__all__ = [
    "EVAL_TEMPLATES",
    "FASHION_CLASSES",
    "clipart_captions",
    "ensure_offline_pairs",
    "png_bytes",
    "read_idx",
    "write_classification",
    "write_retrieval",
]

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
OPENCLIPART_DIR = "/usr/share/openclipart/png"
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip
EVAL_TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a product photo of a {c}.",
]
TRAIN_TEMPLATES = [
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a grayscale picture of a {c}.",
    "a small image of a {c}.",
    "a {c} on a dark background.",
    "a product photo of a {c}.",
]
VERSION = 2  # 2: eval/val sets in CLIP_benchmark's shard naming with nshards.txt


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX (MNIST-format) ``.gz`` file: 2 zero bytes, dtype code, ndim, big-endian int32 dims, data."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-.]+", text.lower()) if w and not w.isdigit()]


def clipart_captions(rel: Path) -> list[str]:
    """Captions from the file name and, when it adds words, the category path (same rule as the eval builder)."""
    name = _words(rel.stem)
    if not name:
        return []
    caps = [f"clip art of {' '.join(name)}."]
    cats = [c for c in (" ".join(_words(p)) for p in rel.parent.parts) if c]
    if cats and set(" ".join(cats).split()) - set(name):
        caps.append(f"{' '.join(name)}, a drawing from the category {', '.join(cats)}.")
    return caps


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _clipart(src: Path, max_file_bytes: int, max_side: int) -> list[tuple[Path, list[str]]]:
    """Candidate clip-art files: one per distinct caption set, not too big to decode quickly."""
    by_caption: dict[tuple[str, ...], Path] = {}
    for f in sorted(src.rglob("*.png")):
        caps = tuple(clipart_captions(f.relative_to(src)))
        if caps and f.stat().st_size <= max_file_bytes:
            by_caption.setdefault(caps, f)
    return [(f, list(c)) for c, f in sorted(by_caption.items(), key=lambda kv: kv[1])]


def _load_clipart(f: Path, max_side: int) -> bytes | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(f) as im:
                if im.width * im.height > 20_000_000:
                    return None
                rgb = to_rgb(im)
    except (OSError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable clip art %s (%s)", f, err)
        return None
    rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return png_bytes(rgb)


def _draw_clipart(
    cdir: Path,
    p: dict,
    rng: random.Random,
    quotas: dict[str, int],
    picture_id: Callable[[bytes], object],
    dedup: Collection[str],
) -> dict[str, list[tuple[str, bytes, list[str]]]]:
    """Clip art (path relative to ``cdir``, PNG bytes, captions) per split of ``quotas``.

    The candidates, in a seeded random order, fill the splits one after the other (in ``quotas`` order);
    unreadable files are skipped, and so is a picture of a split in ``dedup`` whose ``picture_id`` was drawn before.
    """
    cands = _clipart(cdir, p["max_file_bytes"], p["max_side"])
    order = list(range(len(cands)))
    rng.shuffle(order)
    out: dict[str, list[tuple[str, bytes, list[str]]]] = {s: [] for s in quotas}
    seen: set[object] = set()
    for i in order:
        split = next((s for s, n in quotas.items() if len(out[s]) < n), None)
        if split is None:
            break
        f, caps = cands[i]
        data = _load_clipart(f, p["max_side"])
        if data is None:
            continue
        pid = picture_id(data)
        if split in dedup and pid in seen:
            continue
        seen.add(pid)
        out[split].append((str(f.relative_to(cdir)), data, caps))
    return out


def ensure_offline_pairs(
    root: str | Path,
    fashion_train: int = 4000,
    clipart_train: int = 3000,
    fashion_test: int = 2000,
    clipart_test: int = 1000,
    holdout: Sequence[str] = ("bag", "ankle boot"),
    captions_per_image: int = 2,
    max_side: int = 128,
    max_file_bytes: int = 1_500_000,
    seed: int = 0,
    fashion_dir: str = FASHION_DIR,
    openclipart_dir: str = OPENCLIPART_DIR,
    fashion_val: int = 1000,
    clipart_val: int = 500,
) -> Path:
    """Build (or reuse) the offline pairs and eval sets under ``root`` (module docstring); returns ``root``."""
    params = {k: v for k, v in locals().items() if k != "root"}
    params["holdout"], params["version"] = list(holdout), VERSION
    return build_once(Path(root), params, _build, "offline pairs")


def build_once(root: Path, params: dict, build: Callable[[Path, dict, Path, Path], None], what: str) -> Path:
    """Build ``root`` from Debian's Fashion-MNIST and openclipart with ``build(tmp, params, fdir, cdir)`` unless
    its ``manifest.json`` already equals ``params``; built in a temporary sibling and renamed into place, so an
    interrupted build never leaves a half-written ``root`` that a later run would take as finished."""
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == params:
        return root
    bad = sorted(set(params["holdout"]) - set(FASHION_CLASSES))
    if bad:
        raise ValueError(f"holdout classes {bad} are not Fashion-MNIST classes {FASHION_CLASSES}")
    fdir, cdir = Path(params["fashion_dir"]), Path(params["openclipart_dir"])
    if not (fdir / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"{fdir}: no Fashion-MNIST; `apt-get install -y dataset-fashion-mnist`")
    if not cdir.is_dir():
        raise FileNotFoundError(f"{cdir}: no openclipart PNGs; `apt-get install -y openclipart-png`")
    log.info("building %s in %s (%s)", what, root, params)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".tmp-{root.name}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp, params, fdir, cdir)
        (tmp / "manifest.json").write_text(json.dumps(params, indent=1))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _build(out: Path, p: dict, fdir: Path, cdir: Path) -> None:
    rng = random.Random(p["seed"])
    # Fashion-MNIST training pairs (held-out classes excluded), k distinct templated captions per image.
    images, labels = (
        read_idx(fdir / "train-images-idx3-ubyte.gz"),
        read_idx(fdir / "train-labels-idx1-ubyte.gz"),
    )
    held = {FASHION_CLASSES.index(c) for c in p["holdout"]}
    pool = [i for i in range(len(labels)) if int(labels[i]) not in held]
    fm = sorted(rng.sample(pool, min(p["fashion_train"], len(pool))))
    k = max(1, min(p["captions_per_image"], len(TRAIN_TEMPLATES)))

    def fashion_samples():
        for i in fm:
            c = FASHION_CLASSES[int(labels[i])]
            caps = [t.format(c=c) for t in rng.sample(TRAIN_TEMPLATES, k)]
            yield {
                "__key__": f"fm{i:05d}",
                "png": png_bytes(Image.fromarray(images[i], "L")),
                "txt": "\n".join(caps),
            }

    # openclipart: disjoint held-out (eval), training and validation images; test, then train, then validation, so
    # adding validation leaves test and train as they were. A validation picture never repeats a test or train one
    # under another name.
    quotas = {"test": p["clipart_test"], "train": p["clipart_train"], "val": p["clipart_val"]}
    drawn = _draw_clipart(cdir, p, rng, quotas, lambda data: hashlib.sha1(data).digest(), dedup={"val"})
    test_rows, train_rows, val_rows = drawn["test"], drawn["train"], drawn["val"]

    def clipart_samples():
        for j, (_rel, data, caps) in enumerate(train_rows):
            yield {"__key__": f"oc{j:05d}", "png": data, "txt": "\n".join(caps)}

    def mixed():
        yield from fashion_samples()
        yield from clipart_samples()

    sizes = write_tars(out / "train", mixed())
    # Eval sets (CLIP_benchmark layout, readable by alignkit.data.evalsets.load_eval_set).
    ti, tl = read_idx(fdir / "t10k-images-idx3-ubyte.gz"), read_idx(fdir / "t10k-labels-idx1-ubyte.gz")
    sub = sorted(random.Random(p["seed"] + 1).sample(range(len(tl)), min(p["fashion_test"], len(tl))))
    write_classification(out / "eval" / "fashion_mnist", [(f"{i:05d}", ti[i], int(tl[i])) for i in sub])
    write_retrieval(out / "eval" / "openclipart", test_rows)
    # Validation (for choosing recipes; never the eval sets above): Fashion-MNIST *train* images of all 10 classes
    # that are not training images (nor pixel copies of training or test images), and unused clip art.
    taken = {images[i].tobytes() for i in fm} | {ti[i].tobytes() for i in sub}
    vrng = random.Random(p["seed"] + 2)
    val_pool = [i for i in range(len(labels)) if images[i].tobytes() not in taken]
    val = sorted(vrng.sample(val_pool, min(p["fashion_val"], len(val_pool))))
    write_classification(
        out / "val" / "fashion_mnist", [(f"{i:05d}", images[i], int(labels[i])) for i in val]
    )
    write_retrieval(out / "val" / "openclipart", val_rows)
    log.info(
        "offline pairs: %d training samples (%d Fashion-MNIST, %d openclipart) in %d shards; eval %d + %d; "
        "validation %d + %d",
        sum(sizes.values()), len(fm), len(train_rows), len(sizes), len(sub), len(test_rows), len(val),
        len(val_rows),
    )  # fmt: skip


def write_classification(ev: Path, rows: Iterable[tuple[str, np.ndarray, int]]) -> None:
    """A Fashion-MNIST zero-shot eval set (CLIP_benchmark layout) from (key, grey pixels, label) rows."""
    write_eval_shards(
        ev / "test",
        ({"__key__": key, "png": png_bytes(Image.fromarray(x, "L")), "cls": str(y)} for key, x, y in rows),
    )
    (ev / "dataset_type.txt").write_text("classification\n")
    (ev / "classnames.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    (ev / "zeroshot_classification_templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n")


def write_retrieval(ev: Path, rows: list[tuple[str, bytes, list[str]]]) -> None:
    """A clip-art retrieval eval set (CLIP_benchmark layout) from (relative path, PNG bytes, captions) rows;
    ``members.txt`` lists the source files."""
    write_eval_shards(
        ev / "test",
        ({"__key__": f"{j:05d}", "png": d, "txt": "\n".join(c)} for j, (_, d, c) in enumerate(rows)),
    )
    (ev / "dataset_type.txt").write_text("retrieval\n")
    (ev / "members.txt").write_text("".join(f"{rel}\n" for rel, _, _ in rows))
