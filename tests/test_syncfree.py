"""No host synchronisation inside a training step (issue: GPU speed): tests/sync_probe.py counts every
``item`` / ``tolist`` / ``cpu`` / ``numpy`` / ``__bool__`` / ``__float__`` / ``__int__`` / ``to(cpu)`` that alignkit
code makes between two log steps, in both workflows."""

from __future__ import annotations

import sync_probe
from helpers import compose_train

from alignkit.run.train import train


def probed(tmp_path, *overrides: str):
    out = tmp_path / "probe"
    cfg = compose_train(
        [
            *overrides,
            "trainer.log_every_n_steps=4",  # steps 1-3 and 5 are watched; 4 and the last (6) log
            "+callbacks.sync._target_=sync_probe.SyncProbe",
            f"+callbacks.sync.out={out}",
        ],
        tmp_path / "run",
    )
    train(cfg)
    return sync_probe.read(out)


def test_clip_refine_steps_between_log_steps_never_synchronise(tmp_path):
    steps, calls = probed(
        tmp_path, "+experiment=smoke", "evalsets=none", "trainer.max_steps=6", "data.num_samples=64"
    )
    assert steps == 4
    assert calls == [], "\n".join(calls)
