"""scripts/make_shards.py: CSV and COCO-captions JSON → shards + sizes.json that the training pipeline reads."""

from __future__ import annotations

import json
import subprocess
import sys

import webdataset as wds
from helpers import REPO
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


def _make(args, tmp_path, monkeypatch):
    """The script's main() in this process (no interpreter start per call); SystemExit(msg) -> (1, msg)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    try:
        return module.main(args), ""
    except SystemExit as exit_:
        return 1, str(exit_.code)


def test_img2dataset_layout_jpeg_json_and_stats(tmp_path, monkeypatch):
    folder = tmp_path / "png"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (12 + i, 10), (0, i * 60, 0)).save(folder / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"png/{i}.png,c{i}\n" for i in range(3)))
    assert _make(["--csv", "pairs.csv", "--out", "s", "--per-shard", "2"], tmp_path, monkeypatch)[0] == 0
    samples = list(wds.WebDataset(str(tmp_path / "s" / "{00000..00001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [
        "000000000",
        "000000001",
        "000010000",
    ]  # shard + index, img2dataset
    for i, s in enumerate(samples):
        assert set(s) >= {"jpg", "txt", "json"} and "png" not in s
        assert s["jpg"][:3] == b"\xff\xd8\xff"  # re-encoded as JPEG
        meta = json.loads(s["json"])
        assert meta["url"].endswith(f"{i}.png") and (meta["width"], meta["height"]) == (12 + i, 10)
        assert meta["caption"] == f"c{i}" and meta["status"] == "success" and meta["key"] == s["__key__"]
    for shard, n in (("00000", 2), ("00001", 1)):
        stats = json.loads((tmp_path / "s" / f"{shard}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == n and stats["failed_to_download"] == 0
    # --keep-format: the files' own bytes
    assert _make(["--csv", "pairs.csv", "--out", "k", "--keep-format"], tmp_path, monkeypatch)[0] == 0
    kept = list(wds.WebDataset(str(tmp_path / "k" / "00000.tar"), shardshuffle=False))
    assert [s["png"] for s in kept] == [(folder / f"{i}.png").read_bytes() for i in range(3)]


def test_existing_output_is_refused_unless_overwrite(tmp_path, monkeypatch):
    _images(tmp_path, 6)
    (tmp_path / "six.csv").write_text("image,caption\n" + "".join(f"{i}.jpg,c{i}\n" for i in range(6)))
    (tmp_path / "two.csv").write_text("image,caption\n0.jpg,a\n1.jpg,b\n")
    assert _make(["--csv", "six.csv", "--out", "s", "--per-shard", "2"], tmp_path, monkeypatch)[0] == 0
    code, message = _make(["--csv", "two.csv", "--out", "s", "--per-shard", "2"], tmp_path, monkeypatch)
    assert code == 1 and "already holds shards" in message and "--overwrite" in message
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {f"{i:05d}.tar": 2 for i in range(3)}
    assert (
        _make(["--csv", "two.csv", "--out", "s", "--per-shard", "2", "--overwrite"], tmp_path, monkeypatch)[0]
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "sizes.json",
    ]
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"00000.tar": 2}
