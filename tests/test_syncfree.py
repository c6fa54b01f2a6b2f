"""No host synchronisation inside a training step (issue: GPU speed): tests/sync_probe.py counts every
``item`` / ``tolist`` / ``cpu`` / ``numpy`` / ``__bool__`` / ``__float__`` / ``__int__`` / ``to(cpu)`` that alignkit
code makes between two log steps, in both workflows."""

from __future__ import annotations

import time

import dist_workers as dw
import pytest
import sync_probe
import torch.multiprocessing as mp
from helpers import compose_train, free_port, synthetic_shards
from test_structure_train import tiny_cfg

from alignkit.run.train import train


def probe_overrides(out) -> list[str]:
    return [
        "trainer.log_every_n_steps=4",  # of 6 steps, 1-3 and 5 are watched; 4 and the last (6) log
        "callbacks.checkpoint.every_n_train_steps=100",  # a checkpoint may read the device; none in the window
        "+callbacks.sync._target_=sync_probe.SyncProbe",
        f"+callbacks.sync.out={out}",
    ]


def probed(tmp_path, *overrides: str):
    out = tmp_path / "probe"
    train(compose_train([*overrides, *probe_overrides(out)], tmp_path / "run"))
    return sync_probe.read(out)


def test_clip_refine_steps_between_log_steps_never_synchronise(tmp_path):
    steps, calls = probed(
        tmp_path, "+experiment=smoke", "evalsets=none", "trainer.max_steps=6", "data.num_samples=64"
    )
    assert steps == 4
    assert calls == [], "\n".join(calls)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    synthetic_shards(out, n=96, per_shard=48)
    return str(out)


def test_structure_steps_between_log_steps_never_synchronise(tmp_path, shards, tiny_text_dir):
    out = tmp_path / "probe"
    # tiny frozen towers, cached features: 96 pairs / 16 = 6 steps an epoch, one epoch
    train(tiny_cfg(tmp_path, shards, tiny_text_dir, "epochs=1", *probe_overrides(out)))
    steps, calls = sync_probe.read(out)
    assert steps == 4
    assert calls == [], "\n".join(calls)


@pytest.mark.slow
def test_ddp_steps_between_log_steps_never_synchronise(tmp_path):
    """2 real processes (gloo): DDP's all-reduce and the guard's device-side check make no host read either."""
    ctx = mp.start_processes(
        dw.syncprobe_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1):  # raises (and ends the other rank) if one rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run hung")
    for rank in range(2):
        steps, calls = sync_probe.read(tmp_path / "probe", rank)
        assert steps == 4
        assert calls == [], "\n".join(calls)
