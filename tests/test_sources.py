"""Pair sources (alignkit.data.sources): size and identity against independent counts, the one kind dispatch, the
errors of bad keys, and the samples the teacher precompute reads against the keys training batches carry."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from helpers import synthetic_shards
from PIL import Image

from alignkit.data import ImageTextDataModule
from alignkit.data.sources import CsvSource, SyntheticSource, WebDatasetSource, make_source
from alignkit.features.cache import cache_key
from alignkit.features.teacher_store import dataset_identity


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _csv(tmp_path: Path) -> tuple[Path, int]:
    Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        ("red.png", "a red square\na crimson block"),
        ("broken.png", "broken"),
        ("missing.png", "gone"),
        ("blue.png", ""),
        ("blue.png", "a blue square"),
    ]
    text = "image\tcaption\n" + "".join(f'{i}\t"{c}"\n' for i, c in rows)
    (tmp_path / "pairs.tsv").write_text(text)
    return tmp_path / "pairs.tsv", len(rows)


def test_webdataset_size_and_identity_against_the_tars(tmp_path):
    paths = synthetic_shards(tmp_path, n=23, per_shard=10)  # 10 + 10 + 3
    src = make_source("webdataset", train_shards=str(tmp_path))
    assert isinstance(src, WebDatasetSource) and src.urls == [str(p) for p in paths]
    members = 0
    for p in paths:
        with tarfile.open(p) as tar:
            members += sum(1 for m in tar.getmembers() if m.name.endswith(".txt"))
    assert src.size() == members == 23
    assert make_source("webdataset", train_shards=str(tmp_path), num_samples=12).size() == 12
    # The teacher cache's identity (and so its key) is the one it had before sources existed: shards with sizes and
    # mtimes, in order.
    expected = {"source": "webdataset", "shards": [_stat(p) for p in paths]}
    assert src.identity() == expected and cache_key(src.identity()) == cache_key(expected)
    keys = [k for k, _, _ in src.samples()]
    assert keys == [f"{i // 10:05d}{i % 10:04d}" for i in range(23)]


def test_csv_size_identity_and_samples(tmp_path, tiny_encoder):
    path, n_rows = _csv(tmp_path)
    src = make_source("csv", train_csv=str(path))
    assert isinstance(src, CsvSource)
    # every row, usable or not: a bad row is replaced in training, not dropped
    assert src.size() == n_rows == 5
    assert src.identity() == {"source": "csv", "csv": _stat(path), "columns": ["image", "caption"]}
    got = [(k, lines) for k, _, lines in src.samples()]
    # broken, missing and caption-less rows are skipped, as training skips them; keys are row numbers
    assert got == [("0", ["a red square", "a crimson block"]), ("4", ["a blue square"])]
    dm = ImageTextDataModule(
        source="csv", train_csv=str(path), batch_size=1, num_workers=0, pin_memory=False, random_caption=False
    )
    dm.attach(tiny_encoder.preprocess_train, tiny_encoder.preprocess_val, tiny_encoder.tokenizer)
    trained = {k for b in dm.train_dataloader() for k in b["key"]}
    assert trained == {k for k, _ in got}  # every key a batch carries is one the precompute fills


def test_synthetic_size_identity_and_pairs():
    src = make_source("synthetic", num_samples=None, synthetic_image_size=16, seed=3)
    assert isinstance(src, SyntheticSource)
    assert src.size() == 512  # data.num_samples=null: the documented default
    assert src.identity() == {"source": "synthetic", "num_samples": 512, "image_size": 16, "seed": 3}
    small = make_source("synthetic", num_samples=7, seed=3)
    table = small.read_pairs(captions="all")
    assert len(table) == small.size() == 7 == len(list(small.samples()))
    first = next(small.samples())
    assert first[0] == "0" and first[2][0] in table.texts and first[1].size == (32, 32)


def test_the_data_module_and_the_teacher_cache_use_the_same_source(tmp_path):
    synthetic_shards(tmp_path, n=8, per_shard=4)
    dm = ImageTextDataModule(train_shards=str(tmp_path), num_workers=0, batch_size=2)
    assert dm.dataset_size() == dm.pair_source.size() == 8
    assert dm.urls == dm.pair_source.urls == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert dataset_identity(dm) == dm.pair_source.identity()
    with pytest.raises(ValueError, match="pair_source"):
        dataset_identity(object())


def test_unknown_kind_and_missing_keys_fail_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"data\.source='parquet' is not one of webdataset, csv, synthetic"):
        make_source("parquet")
    with pytest.raises(ValueError, match=r"data\.train_shards"):
        make_source("webdataset")
    with pytest.raises(ValueError, match=r"data\.train_csv="):
        make_source("csv")
    with pytest.raises(TypeError, match=r"unknown data keys \['train_shard'\]"):
        make_source("webdataset", train_shard="/data/{0..9}.tar")
    with pytest.raises(FileNotFoundError, match=r"data\.train_csv='/nonexistent.csv'"):
        make_source("csv", train_csv="/nonexistent.csv")
    (tmp_path / "cols.csv").write_text("path,text\nx.png,y\n")
    with pytest.raises(KeyError, match=r"no column 'image'.*data\.image_col"):
        ImageTextDataModule(source="csv", train_csv=str(tmp_path / "cols.csv"))  # checked at construction
    synthetic_shards(tmp_path / "s", n=4, per_shard=4)
    (tmp_path / "s" / "sizes.json").unlink()
    (tmp_path / "s" / "00000_stats.json").unlink()
    with pytest.raises(ValueError, match=r"data\.num_samples"):
        ImageTextDataModule(train_shards=str(tmp_path / "s"))


def test_removed_legacy_mode_and_resampled_map_sources_fail_clearly():
    with pytest.raises(ValueError, match=r"data\.mode=legacy was removed.*data\.mode=exact"):
        ImageTextDataModule(source="synthetic", mode="legacy")
    with pytest.raises(ValueError, match=r"data\.mode=resampled is for webdataset.*data\.mode=exact"):
        ImageTextDataModule(source="synthetic", mode="resampled")
    with pytest.raises(ValueError, match=r"data\.mode='shuffled' is not one of exact, resampled"):
        ImageTextDataModule(source="synthetic", mode="shuffled")
