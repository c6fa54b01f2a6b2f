"""CSV / TSV of (image path, caption) rows as a map-style training source."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from torch.utils.data import Dataset

from alignkit.data.samples import BadSample, BadSampleCounter, PairTransform


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
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.train_csv={str(path)!r} does not exist")
        delim = delimiter or ("\t" if self.path.suffix in (".tsv", ".tab") else ",")
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delim)
            cols = reader.fieldnames or []
            for c in (image_col, caption_col):
                if c not in cols:
                    raise KeyError(
                        f"{self.path} has no column {c!r} (columns: {cols}); set data.image_col / data.caption_col"
                    )
            self.rows = [(r[image_col], r[caption_col] or "") for r in reader]
        if not self.rows:
            raise ValueError(f"{self.path} has no rows")
        self.transform = transform
        self.counter = BadSampleCounter()
        self.root = self.path.parent

    def __len__(self) -> int:
        return len(self.rows)

    def _load(self, idx: int) -> dict:
        img_path, caption = self.rows[idx]
        p = Path(img_path) if Path(img_path).is_absolute() else self.root / img_path
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


def shuffle_rows(rows: list, seed: int) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows
