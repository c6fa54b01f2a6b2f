"""Cached-feature batches: the order STRUCTURE runs have always used, per rank and epoch, and exact mid-epoch resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.data.epochs import EpochPlan, ResumableLoader
from alignkit.data.feature_batches import FeatureEpochBatches
from alignkit.data.features import FeaturePairDataModule


def reference_rows(
    n: int, bs: int, world: int, rank: int, seed: int, epoch: int, rounding: str
) -> list[list[int]]:
    """The rule of the first release, written out: one seeded permutation per epoch, consecutive global batches
    of bs x world positions, rank r takes the r-th block of bs in each, ceil tops up from the permutation's start."""
    steps = (math.floor if rounding == "floor" else math.ceil)(n / (bs * world))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    stream = perm + perm[: max(0, steps * bs * world - n)]
    out = []
    for s in range(steps):
        global_batch = stream[s * bs * world : (s + 1) * bs * world]
        out.append(global_batch[rank * bs : (rank + 1) * bs])
    return out


def _data(n: int, n_img: int, n_txt: int):
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(n_img, 5, generator=g), torch.randn(n_txt, 3, generator=g)
    row_image = torch.randint(0, n_img, (n,), generator=g)
    row_text = torch.randint(0, n_txt, (n,), generator=g)
    return image, row_image, text, row_text


def _node(tmp_path, feats, batch_size: int, rounding: str, rank: int, world: int) -> FeaturePairDataModule:
    dm = FeaturePairDataModule(
        source="synthetic", cache_dir=str(tmp_path), batch_size=batch_size, epoch_rounding=rounding, seed=7
    )
    image, row_image, text, row_text = feats
    dm.feats = {"image": image, "row_image": row_image, "text": text, "row_text": row_text}
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what the node asks of the trainer
    return dm


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_node_batches_follow_the_released_order_on_every_rank(tmp_path, world, rounding):
    n, bs = 50, 4
    feats = _data(n, 20, 30)
    image, row_image, text, row_text = feats
    for rank in range(world):
        loader = _node(tmp_path, feats, bs, rounding, rank, world).train_dataloader()
        assert isinstance(loader, ResumableLoader)
        for epoch in (0, 1, 5):
            loader.set_epoch(epoch)
            got = list(loader)
            want = reference_rows(n, bs, world, rank, seed=7, epoch=epoch, rounding=rounding)
            assert len(loader) == len(got) == len(want)
            assert [b["row"].tolist() for b in got] == want
            for b, rows in zip(got, want, strict=True):
                assert torch.equal(b["image_inputs"], image[row_image[rows]])
                assert torch.equal(b["text_inputs"], text[row_text[rows]])


def test_ranks_split_each_epoch_without_overlap():
    n, bs, world = 48, 4, 3
    batches = FeatureEpochBatches(*_data(n, 10, 10), seed=0)
    rows = []
    for rank in range(world):
        plan = EpochPlan(num_samples=n, batch_size=bs, steps=4, world=world, rank=rank, workers=1)
        rows += [r for b in batches.rows(plan, epoch=3) for r in b.tolist()]
    assert sorted(rows) == list(range(n))


@pytest.mark.parametrize("stop", [0, 3, 7])
def test_a_resumed_loader_yields_exactly_the_rest_of_the_epoch(tmp_path, stop):
    feats = _data(64, 16, 16)
    uninterrupted = _node(tmp_path, feats, 8, "floor", 0, 1).train_dataloader()
    uninterrupted.set_epoch(2)
    full = [b["row"].tolist() for b in uninterrupted]
    node = _node(tmp_path, feats, 8, "floor", 0, 1)
    loader = node.train_dataloader()
    loader.set_epoch(2)
    it = iter(loader)
    for _ in range(stop):
        next(it)
    state = node.state_dict()  # what the checkpoint holds
    assert state["train_loader"]["epoch"] == 2 and state["train_loader"]["batches"] == stop

    fresh = _node(tmp_path, feats, 8, "floor", 0, 1)
    fresh.load_state_dict(state)  # Lightning restores the datamodule before it builds the loader
    resumed = fresh.train_dataloader()
    assert fresh.state_dict() == state  # loaded, not yet iterated: still the checkpoint's position
    resumed.set_epoch(2)
    assert [b["row"].tolist() for b in resumed] == full[stop:]
    resumed.set_epoch(3)  # the next epoch starts from its first batch
    assert len(list(resumed)) == 8


def test_resume_refuses_a_changed_plan(tmp_path):
    feats = _data(64, 16, 16)
    node = _node(tmp_path, feats, 8, "floor", 0, 1)
    node.train_dataloader()
    state = node.state_dict()
    other = _node(tmp_path, feats, 16, "floor", 0, 1)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 8 vs now 16"):
        other.train_dataloader()
