"""No host synchronisation inside a training step (issue: GPU speed): tests/sync_probe.py counts every
``item`` / ``tolist`` / ``cpu`` / ``numpy`` / ``__bool__`` / ``__float__`` / ``__int__`` / ``to(cpu)`` that alignkit
code makes between two log steps, in both workflows."""

from __future__ import annotations

import pytest
import sync_probe
from helpers import compose_train, synthetic_shards
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
