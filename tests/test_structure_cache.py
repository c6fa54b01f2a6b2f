"""Feature cache: hits, misses on any key change, interrupted writes, truncated files, unwritable roots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.features.cache import (
    CacheError,
    FeatureCache,
    cache_key,
    encode_batches,
    feature_key,
    unique_with_index,
    weights_fingerprint,
)

N = 10


def _key(**over):
    parts = feature_key(
        encoder="timm:tf_efficientnet_lite0",
        weights="abc123",
        layers=[0, 3],
        pooling="avg",
        preprocessing={"size": 96, "mean": 0.5},
        dataset="fashion_mnist/train",
        subset=np.arange(N),
    )
    parts.update(over)
    return parts


class Encoder:
    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self):
        self.calls += 1

        def gen():
            for b, s in enumerate(range(0, N, 4)):
                if self.fail_after is not None and b >= self.fail_after:
                    raise KeyboardInterrupt("simulated interruption")
                rows = torch.arange(s, min(s + 4, N), dtype=torch.float32)[:, None]
                yield {0: rows.repeat(1, 3), 3: -rows.repeat(1, 5)}

        return gen()


def test_hit_on_second_run(tmp_path):
    cache, enc = FeatureCache(tmp_path, progress=False), Encoder()
    first = cache.get_or_compute(_key(), enc, num_items=N)
    second = cache.get_or_compute(_key(), enc, num_items=N)
    assert enc.calls == 1
    assert isinstance(second[0], np.memmap) and second[0].shape == (N, 3) and second[3].shape == (N, 5)
    np.testing.assert_array_equal(second[3][:, 0], -np.arange(N))
    assert first.path == second.path and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "change",
    [
        {"encoder": "timm:vit"},
        {"weights": "abc124"},
        {"layers": [0, 4]},
        {"pooling": "cls"},
        {"preprocessing": {"size": 128, "mean": 0.5}},
        {"dataset": "fashion_mnist/test"},
        {"subset": np.r_[np.arange(N - 1), N + 5]},
    ],
)
def test_miss_after_any_key_change(tmp_path, change):
    cache, enc = FeatureCache(tmp_path, progress=False), Encoder()
    cache.get_or_compute(_key(), enc, num_items=N)
    cache.get_or_compute(_key(**change), enc, num_items=N)
    assert enc.calls == 2


def test_large_subset_arrays_hash_fully():
    a = np.arange(5000)
    b = a.copy()
    b[2500] = -1  # str(a) would elide the middle: the key must not
    assert cache_key({"subset": a}) != cache_key({"subset": b})


def test_interrupted_write_is_not_reused(tmp_path):
    cache = FeatureCache(tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(_key(), Encoder(fail_after=2), num_items=N)
    assert cache.load(_key()) is None and not list(tmp_path.glob(".tmp-*"))
    enc = Encoder()
    got = cache.get_or_compute(_key(), enc, num_items=N)
    assert enc.calls == 1 and got[0].shape == (N, 3)


def test_half_written_entry_without_marker_is_rebuilt(tmp_path):
    cache = FeatureCache(tmp_path, progress=False)
    got = cache.get_or_compute(_key(), Encoder(), num_items=N)
    (got.path / "COMPLETE").unlink()  # e.g. a crash between files (older writer) or a manual copy
    enc = Encoder()
    cache.get_or_compute(_key(), enc, num_items=N)
    assert enc.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "delete", "shape"])
def test_damaged_files_are_rebuilt(tmp_path, damage):
    cache = FeatureCache(tmp_path, progress=False)
    got = cache.get_or_compute(_key(), Encoder(), num_items=N)
    file = got.path / got.manifest["layers"]["3"]["file"]
    del got
    if damage == "truncate":
        os.truncate(file, file.stat().st_size - 8)
    elif damage == "delete":
        file.unlink()
    else:
        np.save(file, np.zeros((N, 6), np.float32))
    assert cache.load(_key()) is None
    enc = Encoder()
    again = cache.get_or_compute(_key(), enc, num_items=N)
    assert enc.calls == 1
    np.testing.assert_array_equal(again[3][:, 0], -np.arange(N))


def test_unwritable_root_fails_before_encoding(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="not writable"):
        FeatureCache(blocker / "cache")


def test_wrong_row_count_is_an_error(tmp_path):
    cache = FeatureCache(tmp_path, progress=False)
    with pytest.raises(CacheError, match="expected num_items"):
        cache.get_or_compute(_key(), Encoder(), num_items=N + 1)
    assert cache.load(_key()) is None


def test_unique_items_and_caption_index(tmp_path):
    images = ["a.png", "b.png", "a.png", "c.png", "b.png"]
    uniq, index = unique_with_index(images)
    assert uniq == ["a.png", "b.png", "c.png"] and index.tolist() == [0, 1, 0, 2, 1]
    seen = []

    def compute():
        for name in uniq:
            seen.append(name)
            yield {5: torch.tensor([[float(ord(name[0]))]])}

    got = FeatureCache(tmp_path, progress=False).get_or_compute(
        _key(layers=[5]), compute, num_items=len(uniq), index=index
    )
    assert seen == uniq  # each unique image encoded once
    assert len(got) == 5 and got.rows(5, [3, 4])[:, 0].tolist() == [ord("c"), ord("b")]


def test_fingerprint_and_encode_batches(tmp_path):
    lin = torch.nn.Linear(3, 2)
    fp = weights_fingerprint(lin)
    assert fp == weights_fingerprint(lin)
    with torch.no_grad():
        lin.weight[0, 0] += 1e-3
    assert weights_fingerprint(lin) != fp
    path = tmp_path / "w.pt"
    torch.save(lin.state_dict(), path)
    assert len(weights_fingerprint(path)) == 64

    class Tower:
        def forward_layers(self, x, layers):
            return {i: x * (i + 1) for i in layers}

    out = list(encode_batches(Tower(), [torch.ones(2, 2)], [0, 2]))
    assert out[0][2].tolist() == [[3.0, 3.0], [3.0, 3.0]]


def _concurrent_builder(root: str, sync_dir: str, first: bool, n_others: int) -> None:
    """One 'rank' asking for the entry. The first one's build lasts until the others are asking too."""
    import time

    sync = Path(sync_dir)

    def compute():
        with open(sync / "computes.txt", "a") as f:
            f.write(f"{os.getpid()}\n")
        if first:
            (sync / "started").touch()
            deadline = time.time() + 60
            while len(list(sync.glob("ready-*"))) < n_others and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the others are now inside get_or_compute
        return Encoder()()

    if not first:
        (sync / f"ready-{os.getpid()}").touch()
    got = FeatureCache(root, progress=False).get_or_compute(_key(), compute, num_items=N)
    np.testing.assert_array_equal(got[3][:, 0], -np.arange(N))


@pytest.mark.slow
def test_concurrent_processes_build_an_entry_once(tmp_path):
    # Every rank of a multi-GPU STRUCTURE job prepares its features at start: the first builds, the others wait
    # on the entry's lock and then read it (without the lock each of the 3 processes would encode the data).
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    root = str(tmp_path / "cache")
    first = ctx.Process(target=_concurrent_builder, args=(root, str(tmp_path), True, 2))
    first.start()
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "started").exists(), "the first builder never started computing"
    others = [ctx.Process(target=_concurrent_builder, args=(root, str(tmp_path), False, 2)) for _ in range(2)]
    for p in others:
        p.start()
    for p in [first, *others]:
        p.join(120)
        assert p.exitcode == 0
    assert (tmp_path / "computes.txt").read_text().splitlines() == [str(first.pid)]
    assert len([d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]) == 1
