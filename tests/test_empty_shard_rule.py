"""An empty shard beside good ones is refused before any model is built (naming it, the repetition it would cause
and the fix), unless data.allow_short_shards=true, which trains with one loud WARNING."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import compose_train, keyed_shards

from alignkit.data import ImageTextDataModule
from alignkit.run.preflight import preflight


def _two_good_one_empty(root: Path) -> list[str]:
    urls = keyed_shards(root, [8, 8, 8])
    Path(urls[1]).write_bytes(b"")  # a 0-byte tar; sizes.json still counts 8 samples for it
    return urls


def test_empty_shard_is_refused_naming_it_the_repetition_and_the_fix(tmp_path):
    urls = _two_good_one_empty(tmp_path)
    with pytest.raises(ValueError) as err:
        ImageTextDataModule(train_shards=str(tmp_path), batch_size=4, num_workers=0)
    msg = str(err.value)
    assert urls[1] in msg and urls[0] not in msg and urls[2] not in msg
    assert "1.50x" in msg  # 24 counted / 16 real samples
    assert "data.allow_short_shards=true" in msg and "rebuild" in msg


def test_allow_short_shards_trains_with_one_warning(tmp_path, tiny_encoder, caplog):
    urls = _two_good_one_empty(tmp_path)
    with caplog.at_level(logging.WARNING):
        dm = ImageTextDataModule(
            train_shards=str(tmp_path),
            batch_size=4,
            num_workers=0,
            shuffle_buffer=0,
            pin_memory=False,
            allow_short_shards=True,
        )
    warned = [r for r in caplog.records if "empty shard" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert urls[1] in warned[0].getMessage() and "1.50x" in warned[0].getMessage()
    dm.attach(tiny_encoder.preprocess_train, tiny_encoder.preprocess_val, tiny_encoder.tokenizer)
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(keys) == 24 and set(keys) == {f"{i:09d}" for i in [*range(8), *range(16, 24)]}


def test_a_shard_counted_as_zero_is_not_empty_by_mistake(tmp_path):
    keyed_shards(tmp_path, [8, 0, 8])  # sizes.json says 0: nothing is planned from it, nothing repeats
    assert ImageTextDataModule(train_shards=str(tmp_path), batch_size=4, num_workers=0).dataset_size() == 16


def test_the_key_is_in_the_shard_configs_and_passes_preflight(tmp_path):
    keyed_shards(tmp_path, [8, 8])
    for data in ("webdataset", "features", "features_online"):
        cfg = compose_train([f"data={data}", f"data.train_shards={tmp_path}", "data.allow_short_shards=true"])
        assert cfg.data.allow_short_shards is True
    cfg = compose_train(["data=webdataset", f"data.train_shards={tmp_path}", "data.allow_short_shards=true"])
    cfg.paths.output_dir = str(tmp_path / "run")
    preflight(cfg)
