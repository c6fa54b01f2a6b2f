"""Training data sources: shards read completely and once, bad samples counted, clear errors for bad paths."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers import synthetic_shards

from alignkit.data import ImageTextDataModule
from alignkit.data.samples import PairTransform
from alignkit.data.webdataset import count_samples, expand_urls


def _module(tiny_encoder, **kw) -> ImageTextDataModule:
    dm = ImageTextDataModule(**kw)
    dm.attach(tiny_encoder.preprocess_train, tiny_encoder.preprocess_val, tiny_encoder.tokenizer)
    return dm


def _four_shards_two_workers(tmp_path, tiny_encoder, n: int, **kw) -> ImageTextDataModule:
    """``n`` samples in 4 shards (2 per worker) read by 2 workers."""
    synthetic_shards(tmp_path, n=n, per_shard=n // 4)
    spec = str(tmp_path / "{00000..00003}.tar")
    return _module(tiny_encoder, train_shards=spec, num_workers=2, pin_memory=False, **kw)


def test_shards_read_completely_and_once_across_two_workers(tmp_path, tiny_encoder):
    dm = _four_shards_two_workers(tmp_path, tiny_encoder, n=64, batch_size=8, shuffle_buffer=0)
    assert dm.dataset_size() == 64 and dm.steps_per_epoch(1) == 8
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    # img2dataset keys: shard number (5 digits) + index in the shard (4 digits)
    assert len(keys) == 64 and sorted(keys) == [f"{i // 16:05d}{i % 16:04d}" for i in range(64)]


def test_shuffled_epoch_still_reads_each_sample_once(tmp_path, tiny_encoder):
    dm = _four_shards_two_workers(tmp_path, tiny_encoder, n=48, batch_size=6, shuffle_buffer=20)
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == 8 and sorted(keys) == [f"{i // 12:05d}{i % 12:04d}" for i in range(48)]
    assert keys != sorted(keys)  # the buffer really shuffled
    assert batches[0]["image"].shape == (6, 3, 32, 32) and batches[0]["text"].shape == (6, 16)


def test_corrupt_image_and_missing_caption_are_skipped_and_counted(tmp_path, tiny_encoder, caplog):
    from alignkit.data.shards import image_bytes, write_tars
    from alignkit.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(transform=None, num_samples=10)

    def samples():
        for i in range(10):
            img, cap = ds.item(i)
            yield {"__key__": f"{i:09d}", "jpg": image_bytes(img)[0], "txt": cap}
            if i == 4:
                yield {"__key__": "bad_image", "jpg": b"definitely not a jpeg", "txt": "a caption"}
                yield {"__key__": "no_caption", "jpg": image_bytes(img)[0]}

    # sizes.json says 12: the tar holds 12 samples, 2 of them bad
    assert write_tars(tmp_path, samples(), per_shard=100) == {"00000.tar": 12}
    shard = tmp_path / "00000.tar"
    dm = _module(
        tiny_encoder,
        train_shards=str(shard),
        batch_size=1,
        num_workers=0,
        shuffle_buffer=0,
        random_caption=False,
        pin_memory=False,
    )
    with caplog.at_level(logging.WARNING):
        batches = list(dm.train_dataloader())
    keys = [b["key"][0] for b in batches]
    # 12 planned steps: the 10 good samples in storage order, then the 2 bad ones replaced by spares, which are the
    # next samples of the epoch's order after the worker's range (wrapping to its start).
    assert len(batches) == dm.steps_per_epoch(1) == 12
    assert keys == [f"{i:09d}" for i in range(10)] + ["000000000", "000000001"]
    assert [b["skipped"].item() for b in batches] == [0] * 5 + [2] * 7
    assert any("skipped bad sample" in r.message and "bad_image" in r.message for r in caplog.records)


def test_bad_paths_fail_clearly_before_any_model():
    with pytest.raises(FileNotFoundError, match="shard"):
        ImageTextDataModule(train_shards="/nonexistent/{00000..00003}.tar")
    with pytest.raises(ValueError, match="train_shards"):
        ImageTextDataModule(train_shards=None)
    with pytest.raises(ValueError, match="empty"):
        expand_urls([])
    with pytest.raises(FileNotFoundError, match="train_csv"):
        ImageTextDataModule(source="csv", train_csv="/nonexistent.csv")
    with pytest.raises(ValueError, match=r"data\.source"):
        ImageTextDataModule(source="parquet")


def test_epoch_size_from_sizes_json_stats_or_override(tmp_path):
    synthetic_shards(tmp_path, n=30, per_shard=10)
    urls = expand_urls(str(tmp_path / "{00000..00002}.tar"))
    assert count_samples(urls) == 30
    assert count_samples(urls, num_samples=12) == 12
    assert expand_urls(str(tmp_path)) == urls  # a directory means all its shards
    (tmp_path / "sizes.json").unlink()
    assert count_samples(urls) == 30  # from the *_stats.json written next to each shard (img2dataset layout)
    for p in tmp_path.glob("*_stats.json"):
        p.unlink()
    with pytest.raises(ValueError, match="num_samples"):
        count_samples(urls)
    for i, u in enumerate(urls):
        Path(u).with_name(Path(u).stem + "_stats.json").write_text(json.dumps({"successes": 10 + i}))
    assert count_samples(urls) == 33


def test_steps_per_epoch_rounding(tmp_path, tiny_encoder):
    synthetic_shards(tmp_path, n=50, per_shard=25)
    spec = str(tmp_path / "{00000..00001}.tar")
    assert _module(tiny_encoder, train_shards=spec, batch_size=8).steps_per_epoch(2) == 3  # floor(50/16)
    assert (
        _module(tiny_encoder, train_shards=spec, batch_size=8, epoch_rounding="ceil").steps_per_epoch(2) == 4
    )
    with pytest.raises(ValueError, match="one global batch"):
        _module(tiny_encoder, train_shards=spec, batch_size=64).steps_per_epoch(1)


def test_csv_source_substitutes_and_counts_bad_rows(tmp_path, tiny_encoder):
    from PIL import Image

    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    (tmp_path / "pairs.csv").write_text(
        "image,caption\nred.jpg,a red square\nbroken.jpg,broken\nmissing.jpg,gone\nred.jpg,\n"
    )
    dm = _module(
        tiny_encoder,
        source="csv",
        train_csv=str(tmp_path / "pairs.csv"),
        batch_size=2,
        num_workers=0,
        pin_memory=False,
    )
    ds = dm.train_dataloader().dataset
    items = [ds[i] for i in range(4)]
    assert all(
        torch.equal(it["text"], items[0]["text"]) for it in items
    )  # every bad row replaced by a good one
    assert ds.counter.count >= 3
    (tmp_path / "nocol.csv").write_text("path,text\nred.jpg,x\n")
    with pytest.raises(KeyError, match="image_col"):
        _module(tiny_encoder, source="csv", train_csv=str(tmp_path / "nocol.csv")).train_dataloader()


def test_multi_caption_samples_pick_among_their_captions(tiny_encoder):
    transform = PairTransform(
        tiny_encoder.preprocess_val, tiny_encoder.tokenizer, random_caption=True, seed=1
    )
    from PIL import Image

    from alignkit.data.shards import image_bytes

    data, _ = image_bytes(Image.new("RGB", (8, 8)))
    caps = ["first caption", "second caption", "third caption"]
    seen = {
        tuple(transform({"__key__": "k", "jpg": data, "txt": "\n".join(caps).encode()})["text"].tolist())
        for _ in range(40)
    }
    assert seen == {tuple(tiny_encoder.tokenizer([c])[0].tolist()) for c in caps}


def test_webdataset_reader_is_public_api_only(tmp_path):
    # the shards we write are ordinary webdataset tars that webdataset's own reader understands
    synthetic_shards(tmp_path, n=5, per_shard=5)
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert len(samples) == 5 and {"jpg", "txt"} <= set(samples[0])


def test_to_rgb_composites_every_kind_of_transparency_on_white():
    from PIL import Image

    from alignkit.data.samples import to_rgb

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red over white: (255, 255 - 128·255/255, ...)
    assert list(to_rgb(rgba).getdata()) == [(255, 255, 255), (255, 127, 127)]
    pal = Image.new("P", (1, 1), 3)
    pal.info["transparency"] = 3  # a transparent palette entry
    assert list(to_rgb(pal).getdata()) == [(255, 255, 255)]
    la = Image.new("LA", (1, 1), (0, 0))
    assert list(to_rgb(la).getdata()) == [(255, 255, 255)]
    opaque = Image.new("RGB", (1, 1), (10, 20, 30))
    assert list(to_rgb(opaque).getdata()) == [(10, 20, 30)] and to_rgb(opaque) is not opaque


def test_split_captions_one_per_line_stripped_empty_dropped():
    from alignkit.data.samples import split_captions

    assert split_captions(" a cat \n\n  \r\na dog\n") == ["a cat", "a dog"]
    assert split_captions(b"a red square") == ["a red square"] and split_captions("\n \n") == []
