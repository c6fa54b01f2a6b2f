"""A learnable synthetic image-caption source: coloured shapes on a plain background, captioned by colour and shape.

Used by the smoke experiment and the tests: no files, no network, and a model can really learn it, so a falling
loss means something.
"""

from __future__ import annotations

import io
import random
from typing import Literal

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from alignkit.data.evalsets import ClassificationSet, EvalSet, ImageList, RetrievalSet
from alignkit.data.samples import PairTransform

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("square", "circle", "triangle")


def draw_shape(color: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[color]
    if shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


class SyntheticShapes(Dataset):
    """``num_samples`` deterministic pairs (same index → same image and caption for a given seed)."""

    def __init__(
        self, transform: PairTransform, num_samples: int = 512, image_size: int = 32, seed: int = 0
    ) -> None:
        self.transform, self.num_samples, self.image_size, self.seed = (
            transform,
            num_samples,
            image_size,
            seed,
        )

    def __len__(self) -> int:
        return self.num_samples

    def item(self, idx: int) -> tuple[Image.Image, str]:
        rng = random.Random(self.seed * 1_000_003 + idx)
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        return draw_shape(color, shape, self.image_size, rng), f"a {color} {shape}"

    def __getitem__(self, idx: int) -> dict:
        img, caption = self.item(idx)
        return {
            "image": self.transform.preprocess(img),
            "text": self.transform.tokenizer([caption])[0],
            "key": str(idx),
            "skipped": 0,
            "worker": 0,
        }


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_eval_set(
    task: Literal["classification", "retrieval"] = "classification",
    name: str = "shapes",
    per_class: int = 5,
    image_size: int = 32,
    seed: int = 12345,
) -> EvalSet:
    """An in-memory eval set of the smoke data's distribution (no files).

    * ``classification``: ``per_class`` images of each of the 18 colour × shape classes; class names
      "red square", ...; the single template "a {c}" gives exactly the training captions.
    * ``retrieval``: ``per_class`` images per class, each with the captions "a <colour> <shape>" and
      "a <shape> that is <colour>". Use ``per_class=1``: with more, several gallery images share the same
      captions and retrieval becomes ambiguous.

    Positions and sizes come from ``seed`` (keep it apart from the training seed).
    """
    if task not in ("classification", "retrieval"):
        raise ValueError(f"synthetic_eval_set: task={task!r} is not classification or retrieval")
    if per_class < 1:
        raise ValueError(f"synthetic_eval_set: per_class must be >= 1, got {per_class}")
    rng = random.Random(seed)
    classes = [(c, s) for c in COLORS for s in SHAPES]
    images, labels, captions = [], [], []
    for label, (color, shape) in enumerate(classes):
        for _ in range(per_class):
            images.append(_png(draw_shape(color, shape, image_size, rng)))
            labels.append(label)
            captions.append([f"a {color} {shape}", f"a {shape} that is {color}"])
    if task == "classification":
        return ClassificationSet(name, ImageList(images), labels, [f"{c} {s}" for c, s in classes], ["a {c}"])
    return RetrievalSet(name, ImageList(images), captions)
