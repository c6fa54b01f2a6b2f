"""CSV / TSV of (image path, caption) rows as a map-style training source."""

from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.data import Dataset

from alignkit.data.samples import BadSample, BadSampleCounter, PairTransform, decode_image

PROBE_ROWS = 8  # rows whose images are tried before any model is built


def read_rows(
    path: str | Path, image_col: str = "image", caption_col: str = "caption", delimiter: str | None = None
) -> list[tuple[str, str]]:
    """(image path, caption) of every row; a missing file, a missing column or no rows fail naming the fix.
    Tab-separated for ``.tsv`` / ``.tab``, comma-separated otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_csv={str(path)!r} does not exist")
    delim = delimiter or ("\t" if path.suffix in (".tsv", ".tab") else ",")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delim)
        cols = reader.fieldnames or []
        for c in (image_col, caption_col):
            if c not in cols:
                raise KeyError(
                    f"{path} has no column {c!r} (columns: {cols}); set data.image_col / data.caption_col"
                )
        rows = [(r[image_col], r[caption_col] or "") for r in reader]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def resolve_image(root: Path, image: str) -> Path:
    """An image path of a row: absolute as written, else relative to the CSV's folder."""
    return Path(image) if Path(image).is_absolute() else root / image


def check_some_image_opens(path: Path, rows: list[tuple[str, str]], probe: int = PROBE_ROWS) -> None:
    """Open the images of the first ``probe`` rows, stopping at the first that decodes; if none does, the CSV's
    paths are wrong (missing, moved, relative to another folder) and training would only skip: raise naming the
    CSV, the paths tried and the fix. Costs one image read on a good CSV."""
    tried: list[str] = []
    for image, _ in rows[:probe]:
        p = resolve_image(path.parent, image)
        try:
            decode_image(p.read_bytes(), str(p))
            return
        except OSError as e:
            tried.append(f"{p} ({type(e).__name__})")
        except BadSample:
            tried.append(f"{p} (not a readable image)")
    raise FileNotFoundError(
        f"data.train_csv={str(path)!r}: none of the images of its first {len(tried)} row(s) opens: "
        f"{'; '.join(tried[:3])}{' ...' if len(tried) > 3 else ''}. Image paths are read relative to the CSV's "
        "folder unless absolute: fix the image column (data.image_col) or move the CSV next to its images"
    )


class CsvPairs(Dataset):
    """Rows of ``image_col`` (path, relative to the CSV's folder unless absolute) and ``caption_col``.

    A row whose image is missing/corrupt or whose caption is empty is counted, warned about (rate-limited) and
    replaced by the next usable row, so batches keep their size.
    """

    def __init__(
        self,
        path: str,
        transform: PairTransform,
        image_col: str = "image",
        caption_col: str = "caption",
        delimiter: str | None = None,
        rows: list[tuple[str, str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.rows = rows if rows is not None else read_rows(path, image_col, caption_col, delimiter)
        self.transform = transform
        self.counter = BadSampleCounter()
        self.root = self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, idx: int) -> dict:
        img_path, caption = self.rows[idx]
        p = resolve_image(self.root, img_path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BadSample(f"cannot read image {p}: {e}") from e
        return self.transform({"__key__": str(idx), "jpg": data, "txt": caption})

    def __getitem__(self, idx: int) -> dict:
        for attempt in range(len(self.rows)):
            j = (idx + attempt) % len(self.rows)
            try:
                out = self._load(j)
            except BadSample as e:
                self.counter.skip(str(j), str(e))
                continue
            out["skipped"] = self.counter.count
            out["worker"] = 0
            return out
        raise RuntimeError(f"no usable row in {self.path}")
