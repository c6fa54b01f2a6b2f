"""The offline demo's validation split: disjoint from training and evaluation pictures, all 10 classes, and
adding it leaves the training and evaluation data as they were."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from alignkit.data.offline_pairs import FASHION_DIR, OPENCLIPART_DIR, ensure_offline_pairs

pytestmark = pytest.mark.slow

SMALL = {"fashion_train": 60, "clipart_train": 20, "fashion_test": 40, "clipart_test": 15, "seed": 3}


def _pictures(folder: Path) -> dict[str, list]:
    """Every sample under ``folder``: its decoded pixels and its label or captions."""
    out: dict[str, list] = {"pixels": [], "cls": [], "txt": []}
    for tar in sorted(folder.rglob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            with Image.open(io.BytesIO(s["png"])) as im:
                out["pixels"].append(np.asarray(im.convert("RGB")).tobytes())
            out["cls"] += [int(s["cls"])] if "cls" in s else []
            out["txt"] += [s["txt"].decode()] if "txt" in s else []
    return out


def test_validation_split_is_disjoint_and_leaves_train_and_eval_unchanged(tmp_path):
    assert Path(FASHION_DIR).is_dir() and Path(OPENCLIPART_DIR).is_dir(), "make data (offline datasets)"
    a = ensure_offline_pairs(tmp_path / "a", **SMALL, fashion_val=200, clipart_val=12)
    b = ensure_offline_pairs(tmp_path / "b", **SMALL, fashion_val=30, clipart_val=5)
    train, val_f, val_c = (
        _pictures(a / "train"),
        _pictures(a / "val" / "fashion_mnist"),
        _pictures(a / "val" / "openclipart"),
    )
    test = {p for sub in ("fashion_mnist", "openclipart") for p in _pictures(a / "eval" / sub)["pixels"]}
    assert len(val_f["pixels"]) == 200 and len(val_c["pixels"]) == 12
    val = set(val_f["pixels"]) | set(val_c["pixels"])
    assert not val & set(train["pixels"]) and not val & test  # no validation picture is trained on or tested
    assert set(val_f["cls"]) == set(range(10))  # all 10 classes, the 2 held out of training included
    assert all(t for t in val_c["txt"])
    # Validation is drawn last: a different validation size gives the same training and evaluation data.
    assert _pictures(b / "train") == train
    for sub in ("fashion_mnist", "openclipart"):
        assert _pictures(b / "eval" / sub) == _pictures(a / "eval" / sub)
    assert json.loads((a / "manifest.json").read_text())["fashion_val"] == 200
