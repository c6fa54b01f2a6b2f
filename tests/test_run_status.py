"""The run-status contract: build_run hands one RunStatus to every callback that reports or reads it, train()'s
summary is what that status holds, and the batch plan (max_steps) is fixed before the Trainer is built."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
from helpers import compose_train
from lightning.pytorch.callbacks import Callback

import alignkit.run.train as train_mod
from alignkit.callbacks.evaluation import EvaluationCallback
from alignkit.callbacks.nonfinite import NonFiniteGuard
from alignkit.callbacks.preemption import PreemptionCheckpoint
from alignkit.core.status import RunStatus
from alignkit.data.batch_plan import BatchPlan
from alignkit.run.build import build_run, check_plan
from alignkit.run.cluster import planned_world_size

SMOKE = ["+experiment=smoke", "data.num_samples=128", "epochs=1", "callbacks.evaluation.every_n_steps=0"]


class ReportAtEnd(Callback):
    """Reports into the run status at the end of training, as a third-party callback would."""

    def attach_status(self, status: RunStatus) -> None:
        self.status = status

    def on_train_end(self, trainer, pl_module) -> None:
        self.status.skipped_steps += 7
        self.status.requeued = True


def test_build_run_gives_every_reporting_callback_the_one_status(tmp_path):
    cfg = compose_train(SMOKE, tmp_path)
    run = build_run(cfg, prepare=False, loggers=False)
    kinds = (PreemptionCheckpoint, NonFiniteGuard, EvaluationCallback)
    reporting = [c for c in run.trainer.callbacks if isinstance(c, kinds)]
    assert sorted(type(c).__name__ for c in reporting) == sorted(k.__name__ for k in kinds)
    assert all(c.status is run.status for c in reporting)


def _capture_status(monkeypatch) -> list[RunStatus]:
    seen: list[RunStatus] = []
    real = train_mod.build_run

    def build_and_keep(cfg, **kw):
        run = real(cfg, **kw)
        seen.append(run.status)
        return run

    monkeypatch.setattr(train_mod, "build_run", build_and_keep)
    return seen


def test_a_preempted_runs_summary_and_report_are_the_status(tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)  # outside SLURM: SIGUSR1 saves and stops, nobody requeues
    seen = _capture_status(monkeypatch)
    run = tmp_path / "run"
    cfg = compose_train(
        [
            *SMOKE,
            "+callbacks.kill._target_=run_helpers.SignalAtStep",
            "+callbacks.kill.step=1",
            "+callbacks.kill.sig=SIGUSR1",
            "+callbacks.report._target_=test_run_status.ReportAtEnd",
        ],
        run,
    )
    summary = train_mod.train(cfg)
    (status,) = seen
    assert (status.preempted, status.interrupted_by) == (True, "SIGUSR1")
    # the summary's fields are the status's, including what a non-builtin callback reported into it
    assert summary["preempted"] and summary["interrupted"] and summary["interrupted_by"] == "SIGUSR1"
    assert summary["requeued"] is True and summary["nonfinite_skipped_steps"] == 7
    assert summary["global_step"] == 2  # the signalled batch finishes, then it stops
    assert json.loads((run / "summary.json").read_text())["interrupted_by"] == "SIGUSR1"
    # the evaluation callback read the same status: no final evaluation, the report names the signal
    assert "INTERRUPTED by SIGUSR1 at step 2" in (run / "report.md").read_text()


@pytest.mark.parametrize(
    "trainer_kw, world",
    [
        ({"accelerator": "cpu", "devices": 1}, 1),
        ({"accelerator": "cpu", "devices": "auto"}, 1),
        ({"accelerator": "cpu", "devices": 3, "strategy": "ddp"}, 3),
        ({"accelerator": "cpu", "devices": "2", "num_nodes": 2, "strategy": "ddp"}, 4),
    ],
)
def test_planned_world_size_is_the_world_size_lightning_builds(trainer_kw, world):
    assert planned_world_size(trainer_kw) == world
    trainer = L.Trainer(**trainer_kw, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.world_size == world


def test_a_trainer_that_differs_from_the_plan_is_refused_naming_the_fix():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    plan = BatchPlan(per_device=4, world_size=2, accumulation=1, samples=16, steps_per_epoch=2, epochs=1)
    with pytest.raises(RuntimeError, match=r"world size 2 .*world size 1.*trainer\.devices"):
        check_plan(plan, trainer)
