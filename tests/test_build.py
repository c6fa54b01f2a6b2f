"""The run builder: steps per epoch and the global batch are planned once, as worked out by hand, and the
training entry, the teacher precompute script and the benchmarks all run on that one plan."""

from __future__ import annotations

import argparse
import tempfile

import pytest
from helpers import REPO, compose_train

from alignkit.data.batch_plan import BatchPlan
from alignkit.run.build import DataNode, build_run

# smoke (tiny CLIP, synthetic pairs) on a 2-process CPU DDP trainer: the trainer is built, never launched.
SMALL = [
    "+experiment=smoke",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "data.batch_size=6",
    "data.num_samples=100",
]


@pytest.mark.parametrize(
    "devices, nodes, accumulation, rounding, epochs, steps, global_batch, optimizer_steps",
    [
        # 100 samples / (6 per device x 2 devices = 12 per loader step) = 8.33: floor 8 (4 dropped), ceil 9;
        # global batch 6 x 2 x 3 = 36; optimizer steps: per epoch windows of 3 batches, the last one partial
        # (Lightning steps on it): ceil(8 / 3) = 3 -> 6 over 2 epochs; ceil(9 / 3) = 3 -> 6; 1 epoch of 8 -> 3
        (2, 1, 3, "floor", 2, 8, 36, 6),
        (2, 1, 3, "ceil", 2, 9, 36, 6),
        (2, 1, 3, "floor", 1, 8, 36, 3),
        # 2 nodes x 2 devices: 100 / 24 = 4.17 -> 4 per rank; global batch 6 x 4 x 1 = 24; 4 optimizer steps
        (2, 2, 1, "floor", 1, 4, 24, 4),
    ],
)
def test_build_run_plans_the_epoch_as_worked_out_by_hand(
    tmp_path, devices, nodes, accumulation, rounding, epochs, steps, global_batch, optimizer_steps
):
    cfg = compose_train(
        [
            *SMALL,
            f"trainer.devices={devices}",
            f"trainer.num_nodes={nodes}",
            f"trainer.accumulate_grad_batches={accumulation}",
            f"data.epoch_rounding={rounding}",
            f"epochs={epochs}",
        ],
        tmp_path,
    )
    run = build_run(cfg, callbacks=False, loggers=False)
    assert isinstance(run.data, DataNode)
    assert run.trainer.world_size == devices * nodes
    plan = run.plan
    assert (plan.samples, plan.per_device, plan.world_size, plan.accumulation) == (
        100,
        6,
        devices * nodes,
        accumulation,
    )
    assert (plan.steps_per_epoch, plan.global_batch, plan.optimizer_steps) == (
        steps,
        global_batch,
        optimizer_steps,
    )
    # the trainer stops after the planned optimizer steps; the module logs the planned batch sizes
    assert run.trainer.max_steps == optimizer_steps
    assert run.module.batch_plan is plan
    assert plan.logged() == {"data/batch_per_device": 6.0, "data/batch_global": float(global_batch)}


def test_an_explicit_max_steps_wins_over_the_plan(tmp_path):
    cfg = compose_train([*SMALL, "trainer.devices=2", "trainer.max_steps=3", "epochs=1"], tmp_path)
    run = build_run(cfg, callbacks=False, loggers=False)
    assert run.plan.optimizer_steps == 8  # floor(100 / 12)
    assert run.trainer.max_steps == 3


def test_prepare_false_builds_every_node_without_a_plan(tmp_path):
    run = build_run(compose_train(["+experiment=smoke"], tmp_path), prepare=False)
    assert run.plan is None and run.module.batch_plan is None
    assert run.trainer.max_steps == -1
    # the config's callbacks plus the run identity written into checkpoints, all handed to the trainer
    names = [type(c).__name__ for c in run.callbacks]
    assert "RunIdentity" in names and "EvaluationCallback" in names
    assert all(c in run.trainer.callbacks for c in run.callbacks)


def test_batch_plan_refuses_what_cannot_be_a_plan():
    with pytest.raises(ValueError, match="accumulation must be >= 1"):
        BatchPlan(per_device=8, accumulation=0)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        BatchPlan(per_device=8, steps_per_epoch=4, epochs=-1)
    assert BatchPlan(per_device=8, steps_per_epoch=4, epochs=0).optimizer_steps == 0  # training-free runs
    with pytest.raises(ValueError, match="no epoch length"):
        BatchPlan(per_device=8, world_size=2).optimizer_steps  # noqa: B018
    assert BatchPlan(per_device=8, world_size=2, accumulation=4).global_batch == 64


def test_precompute_teacher_runs_on_the_built_plan(tmp_path, monkeypatch):
    import scripts.precompute_teacher as pt

    cfg = compose_train(
        [
            "+experiment=smoke",
            "callbacks=teacher_cache",
            f"callbacks.teacher_cache.root={tmp_path / 'cache'}",
            "data.num_samples=44",
            "data.batch_size=8",
            "data.epoch_rounding=ceil",
            "trainer.accumulate_grad_batches=2",
        ],
        tmp_path / "run",
    )
    built, batch_sizes = [], []
    real_build, real_precompute = pt.build_run, pt.precompute
    monkeypatch.setattr(pt, "build_run", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(
        pt, "precompute", lambda *a, **k: batch_sizes.append(k["batch_size"]) or real_precompute(*a, **k)
    )
    out = pt.run(cfg)
    plan = built[0].plan
    # 44 samples / 8 per device (1 device) = 5.5 -> ceil 6 loader steps; global batch 8 x 1 x 2 = 16
    assert (out["samples"], out["steps_per_epoch"], out["global_batch"]) == (44, 6, 16)
    assert (plan.samples, plan.steps_per_epoch, plan.global_batch) == (44, 6, 16)
    assert batch_sizes == [8]  # the teacher runs at the run's per-device batch
    assert out["images"] == 44  # every sample of the planned epoch has its teacher embedding


def test_benchmark_trains_exactly_the_planned_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_common as bc
    import bench_overhead

    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": str(tmp_path))  # bc.compose's run directory
    args = argparse.Namespace(model="alignkit-tiny-vit", batch=4, steps=3, lr=1e-3)
    built = []
    real_build = bc.build
    monkeypatch.setattr(bc, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    from alignkit.encoders.openclip import OpenCLIPEncoder

    batches = bench_overhead.make_batches(args, OpenCLIPEncoder(model=args.model, pretrained=None))
    times = bench_overhead.lightning_run(args, "contrastive", batches)
    run = built[0]
    # data.num_samples = 3 steps x 4 = 12 -> 12 / 4 = 3 loader steps = 3 optimizer steps, as many as batches fed
    assert (run.plan.samples, run.plan.steps_per_epoch, run.trainer.max_steps) == (12, 3, 3)
    assert run.trainer.global_step == 3 and len(times) == 2  # 3 step ends, 2 intervals
    # a config whose epoch is not the batches a benchmark feeds is refused, naming the fix
    with pytest.raises(ValueError, match=r"data\.num_samples=20"):
        real_build(bc.compose(bench_overhead.overrides(args, "contrastive")), 5)


def test_a_partial_accumulation_window_is_trained_and_the_run_ends_on_plan(tmp_path):
    """5 loader batches per epoch at accumulation 2, 2 epochs: Lightning steps after batches 2, 4 and 5 of each
    epoch (it closes the partial window at the epoch's end), so 6 optimizer steps see all 10 batches. A plan of
    floor(10 / 2) = 5 steps would stop in the second epoch after its first window (9 batches)."""
    import lightning as L

    class CountBatches(L.Callback):
        def __init__(self) -> None:
            self.batches = 0

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.batches += 1

    cfg = compose_train(
        [
            "+experiment=smoke",
            "data.num_samples=40",
            "data.batch_size=8",
            "data.num_workers=0",
            "trainer.accumulate_grad_batches=2",
            "epochs=2",
            "callbacks.checkpoint=null",
            "callbacks.evaluation=null",
        ],
        tmp_path,
    )
    counter = CountBatches()
    run = build_run(cfg, extra_callbacks=(counter,))
    assert (run.plan.steps_per_epoch, run.plan.optimizer_steps) == (5, 6)
    run.trainer.fit(run.module, datamodule=run.data)
    assert counter.batches == 10
    assert run.trainer.global_step == 6
