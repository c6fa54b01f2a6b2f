"""The exit contract (README, Reliability): how a run that ends by a signal, a failure or a second run is told.

finished -> 0 + summary.json; a signal outside SLURM -> 128 + signal number, last.ckpt, summary.json
``interrupted: true`` with the signal's name, report.md marked interrupted; failed -> non-zero, the cause in
summary.json; a second run on a live run directory -> refused naming the holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_train
from run_helpers import assert_interrupted_run
from safetensors.torch import load_file

from alignkit.run.resume import RunDirLock, RunDirLockedError
from alignkit.run.train import train


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def _start(log_dir: Path, run_id: str, extra: list[str] = ()) -> subprocess.Popen:
    args = [
        "+experiment=smoke",
        "data.num_samples=128",
        "epochs=1",  # 4 steps
        "callbacks.evaluation.every_n_steps=0",
        "trainer.deterministic=true",
        f"paths.log_dir={log_dir}",
        f"run_id={run_id}",
        *extra,
    ]
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=400), p.stdout.read()) for p in procs]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "open_clip/open_clip_model.safetensors")


@pytest.mark.slow
def test_sigterm_and_sigint_exit_128_plus_signal_with_summary_and_resume_exactly(tmp_path):
    runs = tmp_path / "smoke" / "runs"

    def kill_at(
        sig: str,
    ) -> list[str]:  # a real signal to the process at step 1, once (the resume is not signalled)
        once = tmp_path / f"signalled-{sig}"
        return [
            "+callbacks.kill._target_=run_helpers.SignalAtStep",
            "+callbacks.kill.step=1",
            f"+callbacks.kill.sig={sig}",
            f"+callbacks.kill.once_file={once}",
        ]

    names = ("SIGTERM", "SIGINT")
    results = _wait([_start(tmp_path, "ref")] + [_start(tmp_path, s.lower(), kill_at(s)) for s in names])
    assert results[0][0] == 0, results[0][1][-3000:]
    for sig, (rc, out) in zip(names, results[1:], strict=True):
        assert rc == 128 + int(getattr(signal, sig)), out[-3000:]  # 143 / 130: "ended by that signal"
        assert_interrupted_run(runs / sig.lower(), sig, 2)

    # the same commands again: ckpt_path=auto resumes last.ckpt and ends with the uninterrupted run's weights
    resumed = _wait([_start(tmp_path, s.lower(), kill_at(s)) for s in names])
    ref = _weights(runs / "ref")
    for sig, (rc, out) in zip(names, resumed, strict=True):
        assert rc == 0, out[-3000:]
        run = runs / sig.lower()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["resumed_from"] == str(run / "checkpoints/last.ckpt") and summary["global_step"] == 4
        assert not summary["interrupted"]
        got = _weights(run)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), sig
        assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]


def test_a_second_holder_of_a_run_directory_is_refused_naming_the_first(tmp_path):
    with RunDirLock(tmp_path):
        assert f"pid {os.getpid()} on host" in (tmp_path / ".lock").read_text()
        with pytest.raises(RunDirLockedError, match=rf"another run is using .*pid {os.getpid()} on host"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # released on exit: the next run gets it


def test_the_lock_dies_with_a_killed_process(tmp_path):
    code = f"from alignkit.run.resume import RunDirLock; RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(RunDirLockedError, match=f"pid {p.pid} on host"):
        RunDirLock(tmp_path).acquire()
    p.kill()  # kill -9: no cleanup runs, the kernel drops the flock
    p.wait()
    RunDirLock(tmp_path).acquire().release()


def test_train_on_a_held_run_directory_stops_before_the_model_naming_the_holder(tmp_path):
    cfg = compose_train(["+experiment=smoke"], tmp_path / "run")
    with RunDirLock(tmp_path / "run"), pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
        train(cfg)
    assert not (tmp_path / "run" / "summary.json").exists()  # the holder's files are left alone


def test_all_corrupt_checkpoints_fail_the_run_with_the_cause_in_summary(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.ckpt").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="none is intact"):
        train(compose_train(["+experiment=smoke"], tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] and "last.ckpt: unreadable" in summary["error"]
    assert [p.name for p in ck.glob("*.ckpt")] == ["last.ckpt"]  # nothing written beside it (no last-v1.ckpt)
