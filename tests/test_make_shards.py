"""scripts/make_shards.py: CSV and COCO-captions JSON → shards + sizes.json that the training pipeline reads."""

from __future__ import annotations

import json
import subprocess
import sys

import webdataset as wds
from conftest import REPO
from PIL import Image

SCRIPT = str(REPO / "scripts" / "make_shards.py")


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(folder / f"{i}.jpg")


def test_coco_json_groups_captions_per_image(tmp_path):
    _images(tmp_path / "img", 5)
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(5)]
        + [{"id": 9, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": i, "caption": f"caption {i}.{j}"} for i in range(5) for j in range(2)]
        + [{"image_id": 9, "caption": "missing image"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    res = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--coco",
            str(tmp_path / "captions.json"),
            "--images",
            str(tmp_path / "img"),
            "--out",
            str(tmp_path / "shards"),
            "--per-shard",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "1 image(s) missing" in res.stderr
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "{00000..00002}.tar"), shardshuffle=False))
    assert [s["txt"].decode().splitlines() for s in samples] == [
        [f"caption {i}.0", f"caption {i}.1"] for i in range(5)
    ]


def test_csv_rows_of_one_image_merge(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "pairs.csv").write_text("image,caption\n0.jpg,a\n1.jpg,b\n0.jpg,c\n")
    res = subprocess.run(
        [sys.executable, SCRIPT, "--csv", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    samples = list(wds.WebDataset(str(tmp_path / "s" / "00000.tar"), shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == ["a\nc", "b"]
    bad = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--csv",
            str(tmp_path / "pairs.csv"),
            "--caption-col",
            "text",
            "--out",
            str(tmp_path / "t"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "no column 'text'" in bad.stderr
