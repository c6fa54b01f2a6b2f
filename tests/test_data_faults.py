"""Faulty webdataset shards: bad samples are counted skips, short shards are named and never padded with copies,
every rank keeps the planned number of steps, an all-bad dataset fails naming its shards."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import webdataset as wds
from helpers import keyed_shards
from PIL import Image

from alignkit.data import ImageTextDataModule
from alignkit.data.samples import BadSample, PairTransform
from alignkit.data.shards import image_bytes
from alignkit.data.webdataset import expand_urls


def loader(tiny_encoder, root: Path, *, world: int = 1, rank: int = 0, **kw):
    dm = ImageTextDataModule(
        train_shards=str(root),
        pin_memory=False,
        shuffle_buffer=0,
        **{"batch_size": 4, "num_workers": 0, **kw},
    )
    dm.attach(tiny_encoder.preprocess_train, tiny_encoder.preprocess_val, tiny_encoder.tokenizer)
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm, dm.train_dataloader()


LATIN1 = "une légende en Latin-1".encode("latin-1")  # b"\xe9": not UTF-8


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_non_utf8_caption_is_a_counted_skip_named_with_shard_and_key(tmp_path, tiny_encoder, caplog, mode):
    keyed_shards(tmp_path, [8, 8], bad={"000000005": {"txt": LATIN1}})
    with caplog.at_level(logging.WARNING):
        _, batches = loader(tiny_encoder, tmp_path, mode=mode)
        batches = list(batches)
    assert len(batches) == 4 and all(len(b["key"]) == 4 for b in batches)  # 16 // 4 steps, all full
    keys = [k for b in batches for k in b["key"]]
    assert "000000005" not in keys
    if mode == "exact":  # 15 good samples once + 1 spare (another sample of the epoch), never a copy of one
        assert set(keys) == {f"{i:09d}" for i in range(16)} - {"000000005"}
        assert max(Counter(keys).values()) == 2 and len(keys) - len(set(keys)) == 1
        assert batches[-1]["skipped"].max().item() == 1
    warn = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert warn and "000000005" in warn[0] and "00000.tar" in warn[0] and "UTF-8" in warn[0]


def test_every_kind_of_bad_sample_is_skipped_and_counted(tmp_path, tiny_encoder):
    bad = {
        "000000001": {"txt": LATIN1},
        "000000002": {"jpg": b"not an image"},
        "000000003": {"txt": None},  # no caption
        "000000004": {"jpg": None},  # no image
        "000000006": {"txt": "   \n "},  # empty caption
    }
    keyed_shards(tmp_path, [12, 12], bad=bad)
    _, batches = loader(tiny_encoder, tmp_path, num_workers=2, batch_size=4)
    batches = list(batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == 6 and not set(bad) & set(keys)
    # the count travels per worker; the module sums each worker's latest value (data/skipped_samples)
    latest: dict[int, int] = {}
    for b in batches:
        for w, s in zip(b["worker"].tolist(), b["skipped"].tolist(), strict=True):
            latest[w] = max(latest.get(w, 0), s)
    assert sum(latest.values()) == len(bad)
    assert max(Counter(keys).values()) <= 2


def test_image_over_the_pixel_limit_is_a_bad_sample(tiny_encoder, monkeypatch):
    data, _ = image_bytes(Image.new("RGB", (40, 30)))
    transform = PairTransform(tiny_encoder.preprocess_val, tiny_encoder.tokenizer, random_caption=False)
    assert transform({"__key__": "k", "jpg": data, "txt": b"ok"})["key"] == "k"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200 pixels: PIL alone would only warn
    with pytest.raises(BadSample, match="40x30 pixels, over the limit of 1000"):
        transform({"__key__": "k", "jpg": data, "txt": b"ok"})


def _truncate(url: str, keep_samples: int) -> None:
    """Rewrite a shard with only its first ``keep_samples`` samples (sizes.json keeps the old count)."""
    samples = list(wds.WebDataset(url, shardshuffle=False))[:keep_samples]
    with wds.TarWriter(url) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})


def test_short_shard_is_named_and_never_padded_with_copies(tmp_path, tiny_encoder, caplog):
    urls = keyed_shards(tmp_path, [16, 16, 16, 16])
    _truncate(urls[1], 6)  # sizes.json still claims 16
    with caplog.at_level(logging.WARNING):
        _, batches = loader(tiny_encoder, tmp_path, batch_size=8)
        batches = list(batches)
    keys = [k for b in batches for k in b["key"]]
    real = {f"{i:09d}" for i in [*range(16), *range(16, 22), *range(32, 64)]}
    assert len(batches) == 8 and len(keys) == 64
    assert set(keys) == real  # every real sample once, the 10 missing positions filled by 10 other samples
    assert max(Counter(keys).values()) == 2 and len(keys) - len(real) == 10
    assert batches[-1]["skipped"].max().item() == 10
    named = [r.getMessage() for r in caplog.records if "is short" in r.getMessage()]
    assert len(named) == 1 and "00001.tar" in named[0] and "claims 16" in named[0] and "holds 6" in named[0]


def test_empty_shard_on_one_of_two_ranks_keeps_the_same_step_count(tmp_path, tiny_encoder):
    urls = keyed_shards(tmp_path, [8, 8, 8, 8])
    Path(urls[0]).write_bytes(b"")  # a 0-byte tar
    per_rank = []
    for rank in range(2):
        _, batches = loader(
            tiny_encoder, tmp_path, world=2, rank=rank, num_workers=2, allow_short_shards=True
        )
        batches = list(batches)
        assert all(len(b["key"]) == 4 for b in batches)
        per_rank.append([k for b in batches for k in b["key"]])
    assert [len(k) for k in per_rank] == [16, 16]  # 32 // (4 x 2) = 4 steps on each rank
    every = per_rank[0] + per_rank[1]
    assert not {f"{i:09d}" for i in range(8)} & set(every)  # the empty shard's samples do not exist
    assert set(every) == {f"{i:09d}" for i in range(8, 32)} and max(Counter(every).values()) <= 2


def test_all_bad_dataset_fails_naming_the_shards(tmp_path, tiny_encoder):
    keyed_shards(tmp_path, [4, 4], bad={f"{i:09d}": {"txt": LATIN1} for i in range(8)})
    _, batches = loader(tiny_encoder, tmp_path)
    with pytest.raises(RuntimeError, match=r"00000\.tar.*00001\.tar"):
        list(batches)


def test_shard_specs_accept_globs(tmp_path):
    urls = keyed_shards(tmp_path / "a", [2, 2, 2])
    keyed_shards(tmp_path / "b", [2])
    assert expand_urls(str(tmp_path / "a" / "*.tar")) == urls
    assert expand_urls(str(tmp_path / "a" / "0000[02].tar")) == [urls[0], urls[2]]
    both = expand_urls(str(tmp_path / "{a,b}" / "*.tar"))
    assert both == [*urls, str(tmp_path / "b" / "00000.tar")]
    with pytest.raises(FileNotFoundError, match=r"no file matches.*\*\.tgz"):
        expand_urls(str(tmp_path / "a" / "*.tgz"))


def test_smoke_with_webdataset_counts_the_shards_it_is_given(tmp_path):
    from helpers import compose_train
    from hydra.utils import instantiate

    keyed_shards(tmp_path / "shards", [8, 12])
    smoke = compose_train(["+experiment=smoke"])
    assert smoke.data.num_samples == 512  # synthetic's own default still applies
    cfg = compose_train(
        ["+experiment=smoke", "data=webdataset", f"data.train_shards={tmp_path}/shards/*.tar"]
    )
    assert cfg.data.num_samples is None
    assert instantiate(cfg.data).dataset_size() == 20


def test_structure_pair_table_skips_a_non_utf8_caption(tmp_path):
    from alignkit.data.sources import WebDatasetSource

    urls = keyed_shards(tmp_path, [6], bad={"000000002": {"txt": LATIN1}})
    table = WebDatasetSource(list(urls)).read_pairs(captions="first")
    assert len(table.row_image) == 5 and "une légende" not in " ".join(table.texts)


def test_structure_pair_table_skips_a_corrupt_image_naming_it(tmp_path, caplog):
    from alignkit.data.sources import WebDatasetSource

    good = image_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))[0]
    urls = keyed_shards(
        tmp_path,
        [6],
        bad={"000000001": {"jpg": b"not an image"}, "000000004": {"jpg": good[: len(good) // 2]}},
    )
    with caplog.at_level(logging.WARNING, logger="alignkit.data.pair_table"):
        table = WebDatasetSource(list(urls)).read_pairs(captions="first")
    assert len(table.row_image) == 4 and len(table.image_ids) == 4
    named = " ".join(r.getMessage() for r in caplog.records)
    assert "000000001" in named and "000000004" in named and "2 samples" in named
    assert len(list(table.iter_images())) == 4  # feature extraction reads only decodable images
