"""Fail before work (config values, types, writable directories) and the non-finite guard."""

from __future__ import annotations

import json
import re
import time

import dist_workers as dw
import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, compose_train, free_port

from alignkit.callbacks.nonfinite import NonFiniteError
from alignkit.run.preflight import ConfigError
from alignkit.run.train import train

FAST = ["+experiment=smoke", "evalsets=none", "trainer.max_steps=6", "data.num_samples=64"]


@pytest.fixture
def no_model(monkeypatch):
    """Building the encoder fails loudly: a check that passes with this fixture ran before any model was built."""
    from alignkit.encoders.openclip import OpenCLIPEncoder

    def refuse(self, *a, **k):
        raise AssertionError("a model was built before the configuration was checked")

    monkeypatch.setattr(OpenCLIPEncoder, "__init__", refuse)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.weights.rafa=nan", "loss.weights.rafa=nan is not a finite number"),
        ("loss.weights.hycd=-1", "loss.weights.hycd=-1: loss weights must be >= 0"),
        ("loss.hycd.temperature=0", "loss.hycd.temperature=0 must be > 0"),
        ("optimizer.lr=inf", "optimizer.lr=inf is not a finite number"),
        ("optimizer.lr=0", "optimizer.lr=0: the learning rate must be > 0"),
        ("trainer.max_steps=abc", "trainer.max_steps='abc' is not int"),
        ("data.batch_size=big", "data.batch_size='big' is not int"),
        ("data.epoch_rounding=round", "data.epoch_rounding='round' is not Literal"),
        ("optimizer.lr=abc", "optimizer.lr='abc' is not a number"),
        ("loss.weights.rafa=abc", "loss.weights.rafa='abc' is not a number"),
        ("epochs=0", "epochs=0 must be an integer >= 1"),
        ("loss.rafa.std=-1", "loss.rafa.std=-1 must be >= 0"),
        ("loss.hycd.alpha=1.5", "loss.hycd.alpha=1.5: HyCD's mixing weight must be in [0, 1]"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ],
)
def test_bad_setting_fails_before_any_model_is_built(tmp_path, no_model, override, message):
    cfg = compose_train([*FAST, override], tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg)


def test_every_problem_is_listed_at_once(tmp_path, no_model):
    cfg = compose_train([*FAST, "loss.weights.rafa=nan", "trainer.max_steps=abc"], tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert "loss.weights.rafa" in str(e.value) and "trainer.max_steps" in str(e.value)


@pytest.mark.parametrize(
    "key",
    ["callbacks.teacher_cache.root", "callbacks.checkpoint.dirpath", "paths.output_dir", "paths.log_dir"],
)
def test_unwritable_directory_fails_within_seconds_naming_the_key(tmp_path, no_model, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")  # a directory under a file cannot be created, not even by root
    overrides = [*FAST, "callbacks=teacher_cache", f"{key}={blocker}/cache"]
    cfg = compose_train(overrides, None if key == "paths.output_dir" else tmp_path / "run")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"\({key}\) is not writable"):
        train(cfg)
    assert time.monotonic() - start < 5


def _poisoned(tmp_path, action: str):
    cfg = compose_train(
        [
            *FAST,
            f"callbacks.nonfinite.action={action}",
            "+callbacks.poison._target_=run_helpers.NanBatchAtStep",
            "+callbacks.poison.step=3",
        ],
        tmp_path / "run",
    )
    return cfg


def test_nan_loss_stops_naming_the_step_and_terms_and_exports_nothing(tmp_path):
    with pytest.raises(
        NonFiniteError,
        match=r"step 3 \(epoch 1, rank 0\); non-finite loss terms: loss_rafa=nan.*loss_hycd=nan",
    ):
        train(_poisoned(tmp_path, "stop"))
    assert not (tmp_path / "run" / "open_clip").exists()
    # the exit contract: a failed run's summary says so, with the cause
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] and summary["error"].startswith("NonFiniteError: non-finite gradient at step 3")


def test_skip_action_drops_only_the_broken_step(tmp_path):
    summary = train(_poisoned(tmp_path, "skip"))
    assert summary["global_step"] == 6 and summary["nonfinite_skipped_steps"] == 1
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "open_clip" / "open_clip_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


SHIPPED = [f"+experiment={p.stem}" for p in sorted((REPO / "configs" / "experiment").glob("*.yaml"))]
SHIPPED += [f"loss={p.stem}" for p in sorted((REPO / "configs" / "loss").glob("*.yaml"))]


@pytest.mark.parametrize("choice", SHIPPED)
def test_every_shipped_experiment_and_loss_passes_the_checks(choice):
    from alignkit.run.preflight import check_types, check_values

    cfg = compose_train([choice] if choice.startswith("+") else ["+experiment=smoke", choice])
    assert check_values(cfg) + check_types(cfg) == []


def test_with_fp16_loss_scaling_an_overflowing_gradient_is_left_to_the_scaler():
    from types import SimpleNamespace

    from alignkit.callbacks.nonfinite import NonFiniteGuard

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])  # a scaled gradient that overflowed
    opt = torch.optim.SGD([p], lr=0.1)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=object()),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        global_step=7,
        current_epoch=0,
        global_rank=0,
    )
    module = SimpleNamespace(last_loss_terms={"loss": torch.tensor(2.0), "loss_rafa": torch.tensor(1.0)})
    guard = NonFiniteGuard()
    guard.on_before_optimizer_step(trainer, module, opt)  # the scaler skips this step itself
    assert p.grad is not None
    module.last_loss_terms["loss_rafa"] = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 7 .*loss_rafa=nan"):
        guard.on_before_optimizer_step(trainer, module, opt)
    trainer.precision_plugin = SimpleNamespace()  # no scaler: the gradient decides
    module.last_loss_terms["loss_rafa"] = torch.tensor(1.0)
    # without a scaler the gradient decides, on the device: the error comes at the next log step / checkpoint /
    # end of training (here the end), still naming the step that broke
    guard.on_before_optimizer_step(trainer, module, opt)
    trainer.global_step = 9
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 7 .*Noticed at step 9"):
        guard.on_train_end(trainer, module)


NAN_STEP, DDP_STEPS = 2, 4


@pytest.fixture(scope="module")
def ddp_nan(tmp_path_factory):
    """2 real processes (gloo), rank 1's loss NaN at step 2: a ``stop`` run, then a ``skip`` run (tests/dist_workers
    .nonfinite_worker); a rank that waits forever on the other fails the test instead of hanging it."""
    out = tmp_path_factory.mktemp("ddp_nan")
    ctx = mp.start_processes(
        dw.nonfinite_worker,
        args=(2, free_port(), str(out), NAN_STEP),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + 150  # ~11 s alone on 2 cores
    while not ctx.join(timeout=1):  # raises (and ends the other rank) if one rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process non-finite runs hung (one rank waited on the other)")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _digests(run_dir, rank):
    lines = (run_dir / "params" / f"params_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_ddp_nan_loss_on_one_rank_stops_every_rank_at_that_step(ddp_nan):
    out, results = ddp_nan
    for rank, r in enumerate(results):
        # every rank raised at the same step; only rank 1's own loss was NaN, rank 0 learned of it from the gradient
        assert "summary" not in r["stop"]
        assert f"non-finite gradient at step {NAN_STEP} (epoch 0, rank {rank})" in r["stop"]["error"]
        mine = "loss=nan" if rank == 1 else "loss finite on this rank (another rank's was not)"
        assert f"non-finite loss terms: {mine}" in r["stop"]["error"]
    run = out / "stop"
    assert not (run / "open_clip").exists()
    failed = json.loads((run / "summary.json").read_text())  # rank 0's: the cause of the failure
    assert failed["failed"] and f"non-finite gradient at step {NAN_STEP}" in failed["error"]
    # the checkpoints went right up to the broken step and hold no part of it
    steps = []
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        steps.append(state["global_step"])
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert max(steps) == NAN_STEP
    digests = [_digests(run, r) for r in range(2)]
    # action=stop decides on the device and raises at the next log step / checkpoint (here the checkpoint after
    # the broken step, whose file is never written); the test recorder, which runs before the checkpoint
    # callback, also saw the parameters the broken step left: before training, after steps 0, 1 and 2 (NaN)
    assert [d["step"] for d in digests[0]] == list(range(NAN_STEP + 2))
    assert [d["finite"] for d in digests[0]] == [True] * (NAN_STEP + 1) + [False]
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_ddp_nan_loss_on_one_rank_is_skipped_alike_on_every_rank(ddp_nan):
    out, results = ddp_nan
    for r in results:
        assert "error" not in r["skip"], r["skip"]["error"]
        assert r["skip"]["summary"]["global_step"] == DDP_STEPS
        assert r["skip"]["summary"]["nonfinite_skipped_steps"] == 1
    digests = [_digests(out / "skip", r) for r in range(2)]
    assert digests[0] == digests[1]  # bit-identical parameters on both ranks, before and after every step
    d = digests[0]
    assert [x["step"] for x in d] == list(range(DDP_STEPS + 1)) and all(x["finite"] for x in d)
    # d[i] is the state after i steps: step NAN_STEP changed nothing (no parameter, no optimizer-state update),
    # every other step did
    changed = [d[i + 1]["sha"] != d[i]["sha"] for i in range(DDP_STEPS)]
    assert changed == [i != NAN_STEP for i in range(DDP_STEPS)]
    assert [x["optimizer_steps"] for x in d] == [0, 1, 2, 2, 3]
    assert (out / "skip" / "open_clip").is_dir()


@pytest.mark.parametrize(("planned", "allowed"), [(6, 1), (200, 2)])
def test_skip_stops_once_more_than_the_fraction_of_the_run_was_skipped(planned, allowed):
    """Ceiling = max(1, floor(0.01 x planned steps)): a 6-step run may drop one step, a 200-step run two; the next
    non-finite step (not in a row: max_consecutive_skips is not what stops it) ends the run naming the key."""
    from types import SimpleNamespace

    from alignkit.callbacks.nonfinite import NonFiniteGuard

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(),
        estimated_stepping_batches=planned,
        global_step=0,
        current_epoch=0,
        global_rank=0,
    )
    module = SimpleNamespace(last_loss_terms={"loss": torch.tensor(float("nan"))})
    guard = NonFiniteGuard(action="skip", max_consecutive_skips=1)
    for step in range(allowed):
        trainer.global_step = 2 * step
        p.grad = torch.tensor([float("nan"), 0.0])
        guard.on_before_optimizer_step(trainer, module, opt)
        assert p.grad is None  # skipped
        trainer.global_step = 2 * step + 1
        p.grad = torch.ones(2)
        guard.on_before_optimizer_step(trainer, module, opt)  # a good step between: no run of skips
    assert guard.skipped_steps == allowed
    p.grad = torch.tensor([float("nan"), 0.0])
    with pytest.raises(
        NonFiniteError, match=rf"{allowed + 1} skipped steps exceed the ceiling of {allowed} "
    ) as e:
        guard.on_before_optimizer_step(trainer, module, opt)
    assert f"0.01 of the run's {planned} steps, callbacks.nonfinite.max_skip_fraction" in str(e.value)


@pytest.mark.slow  # two fresh interpreters (~10 s each)
@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_unwritable_log_dir_from_the_command_line_fails_naming_the_key_not_hydras_mkdir(tmp_path, entry):
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    experiment = ["+experiment=smoke"] if entry == "train.py" else []
    res = subprocess.run(
        [sys.executable, str(REPO / entry), *experiment, f"paths.log_dir={blocker}/logs"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert res.returncode == 1, res.stderr[-2000:]
    assert "ConfigError: the log directory" in res.stderr and "(paths.log_dir) is not writable" in res.stderr
    assert "Set paths.log_dir to a writable directory" in res.stderr
    assert "Traceback" not in res.stderr  # the message, not Hydra's mkdir stack
