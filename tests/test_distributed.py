"""Cross-rank correctness on 2 real processes (gloo): losses, gradients, and the data plan."""

from __future__ import annotations

import dist_workers as dw
import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, uneven_shards

WORLD = 2


# Every test here shares one 2-process gloo job (~15 s to spawn): the slow tier.
pytestmark = pytest.mark.slow


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Both ranks run every check once (tests/dist_workers.all_worker); the tests read what they wrote."""
    root = tmp_path_factory.mktemp("dist")
    shards, n = uneven_shards(root / "shards")
    out = root / "out"
    out.mkdir()
    mp.start_processes(
        dw.all_worker, args=(WORLD, free_port(), str(out), shards), nprocs=WORLD, start_method="spawn"
    )
    return out, n


@pytest.fixture(scope="module")
def loss_results(spawned):
    return [torch.load(spawned[0] / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize(
    "name",
    [
        "infonce_gather_local",
        "infonce_gather_global",
        "hycd_gather_local",
        "hycd_gather_global",
        "rafa",
        "structure_gathered",
        "alignment",
        "uniformity_gather_local",
        "uniformity_union_gather_local",
        "uniformity_gather_global",
        "cm3_gather_local",
        "cm3_per_modality_gather_global",
        "softened_gather_local",
    ],
)
def test_gathered_losses_and_gradients_equal_one_process_on_the_whole_batch(loss_results, name):
    for r in loss_results:
        full_loss, full_gi, full_gt = r["losses"][name]["full"]
        loss, gi, gt, mean_loss = r["losses"][name]["dist"]
        # gather_local_loss / RaFA: each rank's loss is its rows' share; their mean is the global loss.
        # gather_global_loss: every rank computes the global loss itself.
        _close(mean_loss, full_loss)
        if name.endswith("global"):
            _close(loss, full_loss)
        _close(gi, full_gi)  # DDP-averaged gradient == single-process gradient on the concatenated batch
        _close(gt, full_gt)


def test_local_infonce_is_the_mean_of_per_rank_losses(loss_results):
    # cross_rank=local: each rank only sees its own negatives; the averaged gradient is the mean of the per-chunk
    # single-process gradients, and it differs from the global-batch gradient.
    chunk = [r["losses"]["infonce_local"]["local_chunk"] for r in loss_results]
    mean_gi = sum(c[1] for c in chunk) / WORLD
    for r in loss_results:
        _, gi, _, mean_loss = r["losses"]["infonce_local"]["dist"]
        _close(mean_loss, sum(c[0] for c in chunk) / WORLD)
        _close(gi, mean_gi)
        assert not torch.allclose(gi, r["losses"]["infonce_local"]["full"][1], atol=1e-4)


def test_structure_local_rs_is_global_infonce_plus_the_mean_of_per_rank_rs(loss_results):
    # Default STRUCTURE across ranks: InfoNCE over the gathered batch, R_S on each rank's own batch. The averaged
    # gradient is the global InfoNCE gradient + the mean of the per-chunk R_S gradients (independent references:
    # the InfoNCE-only node on the whole batch, and chunk runs of the full node minus chunk runs of InfoNCE-only).
    infonce_full = loss_results[0]["losses"]["structure_infonce_only"]["full"]
    rs_chunk_grads = []
    for r in loss_results:
        full_chunk = r["losses"]["structure_local_rs"]["local_chunk"]
        nce_chunk = r["losses"]["structure_infonce_only"]["local_chunk"]
        rs_chunk_grads.append([(full_chunk[i] - nce_chunk[i]) for i in (1, 2)])
    for r in loss_results:
        _, gi, gt, _ = r["losses"]["structure_local_rs"]["dist"]
        for k, g in ((0, gi), (1, gt)):
            expected = infonce_full[k + 1] + sum(c[k] for c in rs_chunk_grads) / WORLD
            _close(g, expected)
        # ... which is not the single-process gradient on the whole batch (R_S is not gathered)
        assert not torch.allclose(gi, r["losses"]["structure_local_rs"]["full"][1], atol=1e-4)


def test_tiny_clip_parameter_gradients_under_ddp_equal_one_big_batch(loss_results):
    ref = dw.tiny_reference(WORLD)
    losses = torch.stack([r["model"]["loss"] for r in loss_results])
    # every term is a per-rank mean whose average is the global loss (InfoNCE and HyCD: local rows x gathered cols)
    _close(losses.mean(), ref["loss"])
    for r in loss_results:
        _close(r["model"]["grad"], ref["grad"], tol=2e-5)
    assert ref["grad"].abs().sum() > 0


@pytest.fixture(scope="module")
def data_results(spawned):
    out, n = spawned
    return [torch.load(out / f"data_rank{r}.pt", weights_only=False) for r in range(WORLD)], n


def test_exact_mode_two_ranks_two_workers_uneven_shards_each_sample_once(data_results):
    results, n = data_results
    for epoch in (0, 1):
        per_rank = [[k for b in r["exact"]["epochs"][epoch] for k in b] for r in results]
        steps = [len(r["exact"]["epochs"][epoch]) for r in results]
        assert steps == [6, 6]  # same number of steps on every rank
        union = per_rank[0] + per_rank[1]
        assert len(union) == len(set(union)) == n  # no duplicates, nothing missing
    # a new epoch is a new order
    assert results[0]["exact"]["epochs"][0] != results[0]["exact"]["epochs"][1]


def test_mid_epoch_resume_yields_exactly_the_remaining_batches(data_results):
    results, _ = data_results
    for r in results:
        for mode in ("exact", "resampled"):
            assert r[mode]["state"]["batches"] == 3
            assert r[mode]["resumed"] == r[mode]["epochs"][1]  # same batches, same order, none twice


def test_resampled_mode_same_steps_on_every_rank(data_results):
    results, _ = data_results
    assert [len(r["resampled"]["epochs"][0]) for r in results] == [6, 6]
    assert all(len(b) == 4 for r in results for b in r["resampled"]["epochs"][0])
