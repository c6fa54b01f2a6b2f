"""The offline replication data (``scripts/reproduce.py offline``): real pairs split three ways, disjoint images.

Sources as in :mod:`alignkit.data.offline_pairs` (Debian ``dataset-fashion-mnist`` + ``openclipart-png``):

* ``align/``  — alignment ("pre-training") pairs: Fashion-MNIST *train* images of the seen classes (every class
  but ``holdout``; two templated captions each) + openclipart (captions from file and folder names), written in
  one seeded shuffled order so that the first N samples are a random mixed subset (the low-data rows);
* ``refine/`` — refinement pairs (the role COCO plays for CLIP-Refine): the same kinds of pairs, other images;
* ``val/``    — validation for every hyperparameter choice: Fashion-MNIST *train* images of all 10 classes
  (zero-shot) + openclipart (retrieval, modality gap);
* ``test/``   — held-out evaluation: Fashion-MNIST *test* images of all 10 classes + openclipart.

Disjoint at the image level: every image is identified by the SHA-256 of its decoded pixels; Fashion-MNIST
training images whose pixels also occur in the *whole* test set, and repeated pixels or caption sets of
openclipart, are dropped before splitting. ``splits.json`` lists every split's image ids and pixel hashes;
:func:`split_overlaps` recomputes the hashes from the written files. A second call with the same parameters
returns at once; different parameters rebuild (into a temporary directory renamed at the end).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from alignkit.data.offline_pairs import (
    FASHION_CLASSES,
    FASHION_DIR,
    OPENCLIPART_DIR,
    TRAIN_TEMPLATES,
    _draw_clipart,
    build_once,
    png_bytes,
    read_idx,
    write_classification,
    write_retrieval,
)
from alignkit.data.shards import write_tars

log = logging.getLogger(__name__)

__all__ = ["SPLITS", "ensure_offline_splits", "pixel_hash", "split_images", "split_overlaps"]

SPLITS = ("align", "refine", "val", "test")
VERSION = 1


def pixel_hash(img: Image.Image | np.ndarray) -> str:
    """SHA-256 of an image's RGB pixels and size: equal pictures hash equal whatever file they came from."""
    arr = np.asarray(
        img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(img).convert("RGB")
    )
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()


def ensure_offline_splits(
    root: str | Path,
    fashion_align: int = 4000,
    fashion_refine: int = 1000,
    fashion_val: int = 1000,
    fashion_test: int = 2000,
    clipart_align: int = 3000,
    clipart_refine: int = 1000,
    clipart_val: int = 500,
    clipart_test: int = 1000,
    holdout: Sequence[str] = ("bag", "ankle boot"),
    captions_per_image: int = 2,
    max_side: int = 128,
    max_file_bytes: int = 1_500_000,
    seed: int = 0,
    fashion_dir: str = FASHION_DIR,
    openclipart_dir: str = OPENCLIPART_DIR,
) -> Path:
    """Build (or reuse) the four splits under ``root`` (module docstring); returns ``root``."""
    params = {k: v for k, v in locals().items() if k != "root"}
    params["holdout"], params["version"] = list(holdout), VERSION
    return build_once(Path(root), params, _build, "the offline splits")


def _fashion(p: dict, fdir: Path, rng: random.Random) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """Fashion-MNIST (id, pixels, label) per split; train images never share pixels with the test set."""
    tr_x, tr_y = read_idx(fdir / "train-images-idx3-ubyte.gz"), read_idx(fdir / "train-labels-idx1-ubyte.gz")
    te_x, te_y = read_idx(fdir / "t10k-images-idx3-ubyte.gz"), read_idx(fdir / "t10k-labels-idx1-ubyte.gz")
    test_hashes = {pixel_hash(x) for x in te_x}
    seen: set[str] = set()
    pool = []
    for i in range(len(tr_y)):
        h = pixel_hash(tr_x[i])
        if h in test_hashes or h in seen:  # a training copy of a test picture, or a repeat
            continue
        seen.add(h)
        pool.append(i)
    rng.shuffle(pool)
    held = {FASHION_CLASSES.index(c) for c in p["holdout"]}
    out: dict[str, list[tuple[str, np.ndarray, int]]] = {s: [] for s in SPLITS}
    want = {"val": p["fashion_val"], "align": p["fashion_align"], "refine": p["fashion_refine"]}
    for i in pool:  # val takes all 10 classes; align and refine the seen classes only
        y = int(tr_y[i])
        split = next(
            (
                s
                for s in ("val", "align", "refine")
                if len(out[s]) < want[s] and (s == "val" or y not in held)
            ),
            None,
        )
        if split is not None:
            out[split].append((f"fashion-train:{i}", tr_x[i], y))
        if all(len(out[s]) >= want[s] for s in want):
            break
    test = sorted(random.Random(p["seed"] + 1).sample(range(len(te_y)), min(p["fashion_test"], len(te_y))))
    out["test"] = [(f"fashion-test:{i}", te_x[i], int(te_y[i])) for i in test]
    for s, n in want.items():
        if len(out[s]) < n:
            raise ValueError(f"Fashion-MNIST has only {len(out[s])} usable images for split {s!r}, {n} asked")
    return out


def _openclipart(p: dict, cdir: Path, rng: random.Random) -> dict[str, list[tuple[str, bytes, list[str]]]]:
    """openclipart (relative path, PNG bytes, captions) per split; one image per caption set and per picture."""
    want = {"test": p["clipart_test"], "val": p["clipart_val"], "align": p["clipart_align"],
            "refine": p["clipart_refine"]}  # fmt: skip
    out = _draw_clipart(cdir, p, rng, want, _png_hash, dedup=SPLITS)
    for s, n in want.items():
        if len(out[s]) < n:
            raise ValueError(f"openclipart has only {len(out[s])} usable images for split {s!r}, {n} asked")
    return out


def _build(out: Path, p: dict, fdir: Path, cdir: Path) -> None:
    rng = random.Random(p["seed"])
    fm = _fashion(p, fdir, rng)
    oc = _openclipart(p, cdir, rng)
    k = max(1, min(p["captions_per_image"], len(TRAIN_TEMPLATES)))
    ids: dict[str, dict[str, list[str]]] = {}
    for split in ("align", "refine"):
        samples: list[dict[str, Any]] = []
        for sid, x, y in fm[split]:
            caps = [t.format(c=FASHION_CLASSES[y]) for t in rng.sample(TRAIN_TEMPLATES, k)]
            samples.append({"id": sid, "png": png_bytes(Image.fromarray(x, "L")), "txt": "\n".join(caps)})
        samples += [{"id": f"openclipart:{rel}", "png": d, "txt": "\n".join(c)} for rel, d, c in oc[split]]
        rng.shuffle(samples)  # mixed order: the first N samples of the stream are a random subset
        write_tars(
            out / split,
            ({"__key__": f"{split}{j:05d}", "png": s["png"], "txt": s["txt"]} for j, s in enumerate(samples)),
        )
        ids[split] = {"images": [s["id"] for s in samples]}
    for split in ("val", "test"):
        write_classification(
            out / split / "fashion_mnist", [(f"{j:05d}", x, y) for j, (_, x, y) in enumerate(fm[split])]
        )
        write_retrieval(out / split / "openclipart", oc[split])
        ids[split] = {
            "images": [sid for sid, _, _ in fm[split]] + [f"openclipart:{rel}" for rel, _, _ in oc[split]]
        }
    for split in SPLITS:
        pix = [pixel_hash(x) for _, x, _ in fm[split]]
        with_oc = pix + [_png_hash(d) for _, d, _ in oc[split]]
        ids[split]["pixel_sha256"] = sorted(with_oc)
        ids[split]["counts"] = {"fashion_mnist": len(fm[split]), "openclipart": len(oc[split])}  # type: ignore[assignment]
    (out / "splits.json").write_text(json.dumps(ids, indent=1))
    log.info(
        "offline splits: %s",
        {s: ids[s]["counts"] for s in SPLITS},
    )


def _png_hash(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return pixel_hash(im)


def split_images(root: str | Path, split: str) -> Iterator[Image.Image]:
    """Every image a split holds, decoded from the files written (shards of pairs or eval sets)."""
    import webdataset as wds

    base = Path(root) / split
    for tar in sorted(base.rglob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            key = next(k for k in ("png", "jpg", "jpeg", "webp") if k in s)
            with Image.open(io.BytesIO(s[key])) as im:
                yield im.convert("RGB")


def split_overlaps(root: str | Path) -> dict[str, int]:
    """Number of pictures (pixel hashes, recomputed from the files) shared by each pair of splits."""
    hashes = {s: {pixel_hash(im) for im in split_images(root, s)} for s in SPLITS}
    return {f"{a}&{b}": len(hashes[a] & hashes[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}
