"""Evaluation-set readers: CLIP_benchmark's webdataset layout and a local CSV layout.

Images are kept as encoded bytes or file paths and decoded on access, so a caller can apply any
model's ``preprocess`` and each rank decodes only its own slice.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from alignkit.data.samples import split_captions, to_rgb

__all__ = [
    "ClassificationSet",
    "EvalSet",
    "EvalSetError",
    "ImageList",
    "RetrievalSet",
    "load_csv_eval_set",
    "load_eval_set",
    "load_wds_eval_set",
    "to_rgb",
    "write_eval_shards",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
# CLIP_benchmark's ``--num_workers`` default. Its wds reader (clip_benchmark/datasets/builder.py,
# ``build_wds_dataset``) gives each DataLoader worker whole shards, and webdataset stops a worker that gets none
# with "No samples found": a set needs at least this many shards to run under the default command.
MIN_SHARDS = 4


class EvalSetError(ValueError):
    """An eval set on disk is malformed; the message names the file, the problem and a fix."""


class ImageList(Sequence[Image.Image]):
    """Lazy list of images: each item is encoded bytes or a path, decoded to RGB PIL on access."""

    def __init__(self, items: Sequence[bytes | Path]):
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return ImageList(self._items[i])
        item = self._items[i]
        with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as img:
            return to_rgb(img)


@dataclass(frozen=True)
class ClassificationSet:
    name: str
    images: ImageList
    labels: list[int]
    classnames: list[str]
    templates: list[str]  # each holds "{c}"


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    images: ImageList  # each gallery image once
    captions: list[list[str]]  # captions[i] = all captions of image i

    def flat_captions(self) -> tuple[list[str], list[int]]:
        """All captions in order and, for each, the index of its image."""
        texts = [c for caps in self.captions for c in caps]
        owners = [i for i, caps in enumerate(self.captions) for _ in caps]
        return texts, owners


EvalSet = ClassificationSet | RetrievalSet


def _read_lines(path: Path, what: str, fix: str) -> list[str]:
    if not path.is_file():
        raise EvalSetError(f"{path}: missing {what}. {fix}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise EvalSetError(f"{path}: {what} is empty. {fix}")
    return lines


def _classnames(root: Path) -> list[str]:
    return _read_lines(
        root / CLASSNAMES, "class names", f"Write one class name per line, in label order, to {CLASSNAMES}."
    )


def _templates(root: Path) -> list[str]:
    fix = (
        f"Write one prompt template per line containing '{{c}}', e.g. 'a photo of a {{c}}.', to {TEMPLATES}."
    )
    path = root / TEMPLATES
    templates = _read_lines(path, "zero-shot templates", fix)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise EvalSetError(f"{path}: template(s) without '{{c}}': {bad[:3]}. {fix}")
    return templates


def _check_labels(labels: list[int], classnames: list[str], labels_file: Path, names_file: Path) -> None:
    bad = sorted({y for y in labels if not 0 <= y < len(classnames)})
    if bad:
        raise EvalSetError(
            f"{labels_file}: labels {bad[:10]} are out of range for the {len(classnames)} class names in "
            f"{names_file}. Labels must be 0-based indices into that file; fix the labels or the class list."
        )


def write_eval_shards(
    split_dir: str | Path, samples: Iterable[dict], shard_size: int = 1000, min_shards: int = MIN_SHARDS
) -> int:
    """Write eval samples as CLIP_benchmark reads them: ``split_dir/{0..n-1}.tar`` plus ``nshards.txt``.

    ``n`` is enough shards of at most ``shard_size`` samples and never fewer than ``min_shards`` (when there are
    that many samples), so every one of CLIP_benchmark's default workers gets a shard; samples keep their order
    across shards. Returns the number of samples written; raises ``EvalSetError`` when there are none.
    """
    out = Path(split_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(samples)
    if not rows:
        raise EvalSetError(f"{out}: no samples to write; check the source data and --limit.")
    n = min(len(rows), max(min_shards, -(-len(rows) // shard_size)))
    bounds = [round(i * len(rows) / n) for i in range(n + 1)]
    for i in range(n):
        tmp = out / f"{i}.tar.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for row in rows[bounds[i] : bounds[i + 1]]:
                sink.write(row)
        tmp.replace(out / f"{i}.tar")
    (out / "nshards.txt").write_text(f"{n}\n")
    return len(rows)


def _shard_sort_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def load_wds_eval_set(path: str | Path, name: str | None = None, split: str = "test") -> EvalSet:
    """Read a CLIP_benchmark webdataset eval set.

    ``path`` holds ``classnames.txt``, ``zeroshot_classification_templates.txt`` (classification only),
    optionally ``dataset_type.txt`` ("retrieval"), and the shards either in ``<path>/<split>/`` or in
    ``<path>`` itself. Samples carry ``<key>.webp|png|jpg|jpeg`` plus ``<key>.cls`` (an integer label)
    or ``<key>.txt`` (captions, one per line).
    """
    root = Path(path)
    if not root.is_dir():
        raise EvalSetError(
            f"{root}: eval-set directory not found. Build it with scripts/build_evalsets.py (see "
            f"docs/evaluation.md) or fix the path (configs/evalsets/*.yaml read it from paths.data_dir)."
        )
    shard_dir = root / split if (root / split).is_dir() else root
    shards = sorted(shard_dir.glob("*.tar"), key=_shard_sort_key)
    if not shards:
        raise EvalSetError(
            f"{shard_dir}: no *.tar shards found. Build the set with scripts/build_evalsets.py or point to the "
            f"directory that holds the shards (or their '{split}/' subdirectory)."
        )
    type_file = root / "dataset_type.txt"
    declared = type_file.read_text().strip().lower() if type_file.is_file() else None

    images: list[bytes] = []
    labels: list[int] = []
    captions: list[list[str]] = []
    for shard in shards:
        n_before = len(images)
        ds = wds.WebDataset(
            str(shard), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        try:
            for sample in ds:
                key = sample.get("__key__")
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    raise EvalSetError(f"{shard}: sample '{key}' has no image ({'/'.join(IMAGE_EXTS)}).")
                images.append(sample[ext])
                if "cls" in sample:
                    labels.append(int(sample["cls"].decode().strip()))
                elif "txt" in sample:
                    caps = split_captions(sample["txt"])
                    if not caps:
                        raise EvalSetError(f"{shard}: sample '{key}' has an empty .txt (no captions).")
                    captions.append(caps)
                else:
                    raise EvalSetError(
                        f"{shard}: sample '{key}' has neither .cls (label) nor .txt (captions)."
                    )
        except EvalSetError:
            raise
        except Exception as e:  # tar/IO errors from webdataset: say which shard
            raise EvalSetError(f"{shard}: cannot read shard ({type(e).__name__}: {e}).") from e
        if len(images) == n_before:
            raise EvalSetError(f"{shard}: shard holds no samples. Delete it or rebuild the eval set.")
    if labels and captions:
        raise EvalSetError(f"{shard_dir}: shards mix .cls and .txt samples; an eval set is one task.")

    name = name or root.name
    if captions:
        if declared not in (None, "retrieval"):
            raise EvalSetError(f"{type_file}: says '{declared}' but the samples carry captions (.txt).")
        return RetrievalSet(name, ImageList(images), captions)
    classnames = _classnames(root)
    _check_labels(labels, classnames, shard_dir, root / CLASSNAMES)
    return ClassificationSet(name, ImageList(images), labels, classnames, _templates(root))


def load_csv_eval_set(path: str | Path, name: str | None = None) -> EvalSet:
    """Read a CSV eval set; image paths are relative to the CSV.

    * columns ``image,label``: classification; ``label`` is a 0-based index or a class name from
      ``classnames.txt`` next to the CSV; templates from ``zeroshot_classification_templates.txt``.
    * columns ``image,caption``: retrieval; several rows with one image give one gallery image with
      several captions (first-appearance order).
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise EvalSetError(f"{csv_path}: CSV file not found.")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        rows = list(reader)
    if "image" not in cols or not ({"label", "caption"} & cols) or {"label", "caption"} <= cols:
        raise EvalSetError(
            f"{csv_path}: header must be 'image,label' (classification) or 'image,caption' (retrieval), "
            f"got {sorted(cols)}."
        )
    if not rows:
        raise EvalSetError(f"{csv_path}: no rows.")
    base = csv_path.parent
    missing = sorted({r["image"] for r in rows if not (base / r["image"]).is_file()})
    if missing:
        raise EvalSetError(
            f"{csv_path}: {len(missing)} image file(s) not found, e.g. {missing[:3]} (paths are relative to "
            f"{base}). Fix the paths or remove those rows."
        )
    name = name or csv_path.stem
    if "caption" in cols:
        order: dict[str, int] = {}
        captions: list[list[str]] = []
        for r in rows:
            i = order.setdefault(r["image"], len(order))
            if i == len(captions):
                captions.append([])
            if r["caption"].strip():
                captions[i].append(r["caption"].strip())
        empty = [img for img, i in order.items() if not captions[i]]
        if empty:
            raise EvalSetError(f"{csv_path}: image(s) with only empty captions: {empty[:3]}.")
        return RetrievalSet(name, ImageList([base / p for p in order]), captions)

    classnames = _classnames(base)
    index = {c: i for i, c in enumerate(classnames)}
    labels: list[int] = []
    for line, r in enumerate(rows, start=2):
        raw = r["label"].strip()
        if raw.lstrip("-").isdigit():
            labels.append(int(raw))
        elif raw in index:
            labels.append(index[raw])
        else:
            raise EvalSetError(
                f"{csv_path}:{line}: label '{raw}' is neither an index nor a name in {base / CLASSNAMES}."
            )
    _check_labels(labels, classnames, csv_path, base / CLASSNAMES)
    return ClassificationSet(
        name, ImageList([base / r["image"] for r in rows]), labels, classnames, _templates(base)
    )


def load_eval_set(path: str | Path, name: str | None = None) -> EvalSet:
    """A ``.csv`` file is read with :func:`load_csv_eval_set`, a directory with :func:`load_wds_eval_set`."""
    p = Path(path)
    return load_csv_eval_set(p, name) if p.suffix.lower() == ".csv" else load_wds_eval_set(p, name)
