"""alignkit make-shards (scripts/make_shards.py): CSV and COCO-captions JSON → shards + sizes.json that the training
pipeline reads; bad images counted, never fatal; per-shard parquet; no partial tar."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import webdataset as wds
from helpers import REPO
from PIL import Image

SCRIPT = str(REPO / "scripts" / "make_shards.py")


def _images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(folder / f"{i}.jpg")


@pytest.mark.slow
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
    assert "failed_to_download: 1" in res.stderr and "gone.jpg" in res.stderr
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    stats = json.loads((tmp_path / "shards" / "00002_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (2, 1, 1)
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "{00000..00002}.tar"), shardshuffle=False))
    assert [s["txt"].decode().splitlines() for s in samples] == [
        [f"caption {i}.0", f"caption {i}.1"] for i in range(5)
    ]


@pytest.mark.slow
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
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "sizes.json",
    ]
    assert json.loads((tmp_path / "s" / "sizes.json").read_text()) == {"00000.tar": 2}


def test_corrupt_and_missing_images_are_counted_named_and_not_fatal(tmp_path, monkeypatch, caplog):
    import pyarrow.parquet as pq

    _images(tmp_path, 4)
    (tmp_path / "2.jpg").write_bytes(b"not an image at all")  # UnidentifiedImageError in PIL
    good = (tmp_path / "3.jpg").read_bytes()
    (tmp_path / "3.jpg").write_bytes(good[: len(good) // 2])  # truncated: a valid header, a broken body
    rows = "".join(f"{i}.jpg,c{i}\n" for i in range(4)) + "gone.jpg,c4\n"
    (tmp_path / "pairs.csv").write_text("image,caption\n" + rows)
    with caplog.at_level("WARNING"):
        code, _ = _make(["--csv", "pairs.csv", "--out", "s", "--per-shard", "3"], tmp_path, monkeypatch)
    assert code == 0
    out = tmp_path / "s"
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 0}
    s0, s1 = (json.loads((out / f"0000{i}_stats.json").read_text()) for i in (0, 1))
    assert (s0["count"], s0["successes"], s0["failed_to_decode"], s0["failed_to_download"]) == (3, 2, 1, 0)
    assert (s1["count"], s1["successes"], s1["failed_to_decode"], s1["failed_to_download"]) == (2, 0, 1, 1)
    named = caplog.text
    assert all(f"{name}" in named for name in ("2.jpg", "3.jpg", "gone.jpg"))
    assert "failed_to_decode: 2" in named and "failed_to_download: 1" in named
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False)]
    assert keys == ["000000000", "000000001"]
    # the parquet: one row per input with the .json's fields, failures included
    table = (
        pq.read_table(out / "00000.parquet").to_pylist() + pq.read_table(out / "00001.parquet").to_pylist()
    )
    assert [r["status"] for r in table] == ["success"] * 2 + ["failed_to_decode"] * 2 + ["failed_to_download"]
    assert [r["key"] for r in table] == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert table[4]["url"].endswith("gone.jpg") and "FileNotFoundError" in table[4]["error_message"]
    sample = next(iter(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"]) == table[0]


def test_failure_warnings_are_rate_limited(caplog):
    from alignkit.data.shards import FailureLog

    failures = FailureLog(first=3, every_s=3600)
    with caplog.at_level("WARNING"):
        for i in range(50):
            failures.add("failed_to_decode", f"img{i}.jpg", "broken")
    assert failures.counts == {"failed_to_decode": 50} and failures.first_source == "img0.jpg"
    assert len(caplog.records) == 3


def test_interrupted_run_leaves_no_partial_tar(tmp_path):
    from alignkit.data.shards import write_shards

    _images(tmp_path / "img", 3)

    class Interrupting(Image.Image):
        def load(self):
            raise KeyboardInterrupt  # Ctrl-C while the second shard is being written (one sample already in it)

    pairs = [(tmp_path / "img" / f"{i}.jpg", f"c{i}") for i in range(3)] + [(Interrupting(), "x")]
    with pytest.raises(KeyboardInterrupt):
        write_shards(pairs, tmp_path / "s", samples_per_shard=2)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert len(list(wds.WebDataset(str(tmp_path / "s" / "00000.tar"), shardshuffle=False))) == 2


def test_write_tars_bytes_do_not_depend_on_the_temporary_name(tmp_path):
    """write_tars (the offline builders' writer) stores the same members as a plain TarWriter on the final path
    (the member names and bytes; a tar's mtime fields differ from run to run anyway)."""
    import tarfile

    def members(path):
        with tarfile.open(path) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]

    from alignkit.data.shards import write_tars

    samples = [{"__key__": f"k{i}", "txt": f"caption {i}".encode()} for i in range(3)]
    write_tars(tmp_path / "a", samples, per_shard=2)
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        for s in samples[:2]:
            sink.write(s)
    assert members(tmp_path / "a" / "00000.tar") == members(tmp_path / "b.tar")
    assert not list((tmp_path / "a").glob("*.partial"))


@pytest.mark.slow
def test_killed_run_leaves_no_partial_tar(tmp_path):
    """SIGKILL while the second shard is being written (one sample already in it): the first shard is whole, the
    second has no .tar at all (only its temporary .partial)."""
    _images(tmp_path / "img", 3)
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from PIL import Image
from alignkit.data.shards import write_shards

class Killer(Image.Image):
    def load(self):
        os.kill(os.getpid(), signal.SIGKILL)

pairs = [(Path({str(tmp_path / "img")!r}) / f"{{i}}.jpg", f"c{{i}}") for i in range(3)] + [(Killer(), "x")]
write_shards(pairs, {str(tmp_path / "s")!r}, samples_per_shard=2)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == -9, res.stderr
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar*")) == ["00000.tar", "00001.tar.partial"]
    assert len(list(wds.WebDataset(str(tmp_path / "s" / "00000.tar"), shardshuffle=False))) == 2
