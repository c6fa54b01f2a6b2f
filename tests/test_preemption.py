"""Kill-and-resume: a run signalled mid-epoch and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_train, uneven_shards
from run_helpers import assert_interrupted_run

from alignkit.run.train import train


def _cfg(run: Path, shards: str, extra: list[str]):
    return compose_train(
        [
            "+experiment=smoke",
            "data=webdataset",
            f"data.train_shards='{shards}'",
            "data.num_samples=null",
            "data.batch_size=4",
            "data.num_workers=2",
            "data.shuffle_buffer=8",
            "data.pin_memory=false",
            "epochs=2",  # 48 samples / 4 = 12 steps per epoch -> 24 steps
            "trainer.deterministic=true",
            "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.every_n_train_steps=1000",
            "+callbacks.keys._target_=run_helpers.RecordKeys",
            f"+callbacks.keys.dirpath={run}",
            *extra,
        ],
        run,
    )


def _keys(run: Path) -> list[list[str]]:
    lines = [json.loads(x) for x in (run / "keys_rank0.jsonl").read_text().splitlines()]
    return [x["keys"] for x in lines]


@pytest.mark.slow
def test_signal_mid_epoch_then_resume_is_bit_identical_and_sees_each_sample_once(tmp_path):
    shards, n = uneven_shards(tmp_path / "shards")
    ref = train(_cfg(tmp_path / "ref", shards, []))
    assert ref["global_step"] == 24 and not ref["preempted"]

    run = tmp_path / "run"
    signal_at = [
        "+callbacks.kill._target_=run_helpers.SignalAtStep",
        "+callbacks.kill.step=17",  # mid-epoch 2 (steps 12..23)
        "+callbacks.kill.sig=SIGUSR1",
        f"+callbacks.kill.once_file={tmp_path / 'signalled'}",
    ]
    first = train(_cfg(run, shards, signal_at))
    assert first["preempted"] and first["global_step"] == 18  # the signalled batch finishes, then it stops
    assert not (run / "open_clip").exists()
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 18
    second = train(_cfg(run, shards, signal_at))  # the "requeued" job: same run dir, ckpt_path=auto
    assert second["resumed_from"] == str(run / "checkpoints/last.ckpt") and second["global_step"] == 24

    # the interrupted + resumed run trained on exactly the batches of the uninterrupted one, in the same order
    assert _keys(run) == _keys(tmp_path / "ref")
    for epoch in range(2):
        seen = [k for b in _keys(run)[epoch * 12 : (epoch + 1) * 12] for k in b]
        assert len(seen) == len(set(seen)) == n

    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "ref/open_clip/open_clip_model.safetensors"),
        load_file(run / "open_clip/open_clip_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_checkpoint_from_another_architecture_is_refused(tmp_path, tiny_encoder):
    from alignkit.losses import InfoNCE
    from alignkit.modules.clip_refine import AlignModule
    from alignkit.run.checkpointing import check_checkpoint_compatible

    module = AlignModule(tiny_encoder, InfoNCE(), optimizer=torch.optim.AdamW)
    cfg = compose_train(["+experiment=smoke"])
    sd = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    sd["model.visual.proj"] = torch.zeros(3, 3)
    del sd["model.logit_scale"]
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": sd, "alignkit": {"encoder": {**tiny_encoder.spec, "model": "ViT-B-32"}}}, path)
    with pytest.raises(ValueError, match="refusing to resume") as e:
        check_checkpoint_compatible(path, module, cfg)
    msg = str(e.value)
    assert "ViT-B-32" in msg and "shape mismatch" in msg and "missing" in msg and "ckpt_path" in msg


def test_trainer_preset_disagreeing_with_slurm_fails_naming_the_value(monkeypatch):
    from alignkit.run.cluster import check_trainer_matches_slurm

    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "2")
    check_trainer_matches_slurm({"devices": 2, "num_nodes": 2})
    with pytest.raises(ValueError, match=r"set trainer.devices=2") as e:
        check_trainer_matches_slurm({"devices": 4, "num_nodes": 1})
    assert "set trainer.num_nodes=2" in str(e.value)
    cfg = compose_train(["+experiment=smoke", "trainer=ddp"])
    assert cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 2  # read from the allocation


def test_submitit_handler_is_called_once_after_the_run_has_wound_down(tmp_path):
    # Under Hydra's submitit launcher SIGUSR2 belongs to submitit, whose handler requeues and exits the process.
    # alignkit saves at the batch boundary, lets every callback finish that batch and writes the run summary,
    # and only then calls that handler.
    import signal

    run = tmp_path / "run"
    calls = []

    def submitit_like(signum, frame):
        calls.append(
            {
                "signum": signum,
                "summary": (run / "summary.json").is_file(),
                "keys": len((run / "keys_rank0.jsonl").read_text().splitlines()),
            }
        )
        raise SystemExit(-1)  # what submitit's checkpoint_and_try_requeue ends with

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        cfg = compose_train(
            [
                "+experiment=smoke",
                "trainer.max_steps=8",
                "callbacks.checkpoint.every_n_train_steps=1000",
                "+callbacks.keys._target_=run_helpers.RecordKeys",
                f"+callbacks.keys.dirpath={run}",
                "+callbacks.kill._target_=run_helpers.SignalAtStep",
                "+callbacks.kill.step=3",
                "+callbacks.kill.sig=SIGUSR2",
            ],
            run,
        )
        with pytest.raises(SystemExit):
            train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    # the signalled batch (step 3 -> 4) finished with every callback, then the summary, then the hand-over
    assert calls == [{"signum": signal.SIGUSR2, "summary": True, "keys": 4}]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"] and summary["global_step"] == 4
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.slow
def test_signal_outside_slurm_writes_last_ckpt_marks_the_run_interrupted_and_exits_non_zero(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    args = [
        "+experiment=smoke",
        "data.num_samples=128",
        "epochs=1",  # 4 steps
        "callbacks.evaluation.every_n_steps=0",
        "+callbacks.kill._target_=run_helpers.SignalAtStep",
        "+callbacks.kill.step=1",
        "+callbacks.kill.sig=SIGUSR1",
        f"paths.log_dir={tmp_path}",
        "run_id=sig",
    ]
    res = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 128 + 10, res.stderr[-3000:]  # 128 + SIGUSR1: "ended by a signal"
    assert_interrupted_run(tmp_path / "smoke" / "runs" / "sig", "SIGUSR1", 2)
