"""A real single-node SLURM on localhost (scripts/slurm/localhost_cluster.sh): sweep, 2-task DDP, signal + requeue.

The cluster is started by this module (and stopped at the end); if it cannot start, the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER = REPO / "scripts" / "slurm" / "localhost_cluster.sh"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="session")
def slurm():
    res = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(
            f"could not start the localhost SLURM cluster:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ALIGNKIT_PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    env.pop("ALIGNKIT_SWEEP_ID", None)
    # the job's rendezvous comes from SLURM (Lightning's SLURMEnvironment), never from whatever this process holds
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    return env


def _sbatch(tmp_path: Path, args: list[str], overrides: list[str]) -> str:
    cmd = ["sbatch", "--parsable", "--time=15", f"--output={tmp_path}/slurm-%j.out", *args]
    cmd += [str(REPO / "scripts/slurm/train.sbatch"), *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(tmp_path), check=True)
    return res.stdout.strip().split(";")[0]


def _state(job: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True
    )
    states = [s.split()[0] for s in out.stdout.split() if s.strip()]
    return states[-1] if states else "UNKNOWN"


def _wait(job: str, tmp_path: Path, timeout: float = 420) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        queued = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
        state = _state(job)
        if not queued and state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob(f"slurm-{job}.out"))
    pytest.fail(f"job {job} did not finish in {timeout} s (state {_state(job)}):\n{logs}")


def _log(tmp_path: Path, job: str) -> str:
    p = tmp_path / f"slurm-{job}.out"
    return p.read_text() if p.exists() else ""


SMOKE = ["+experiment=smoke", "export=true", "trainer.log_every_n_steps=1"]
# A deterministic 24-step run slowed to ~0.4 s a step, so that a test can signal it mid-epoch.
SLOW_RUN = [
    *SMOKE,
    "data.num_samples=96",
    "data.batch_size=4",
    "epochs=1",  # 24 steps
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1000",
    "+callbacks.slow._target_=run_helpers.Sleep",
    "+callbacks.slow.seconds=0.4",
]


def _keys_file(log_dir: Path) -> list[str]:
    return ["+callbacks.keys._target_=run_helpers.RecordKeys", f"+callbacks.keys.dirpath={log_dir}/keys"]


def _wait_for_steps(log_dir: Path, n: int, why) -> None:
    """Until the run under ``log_dir`` has recorded ``n`` trained batches (``why()`` explains a failure)."""
    keys = log_dir / "keys" / "keys_rank0.jsonl"
    end = time.monotonic() + 300
    while time.monotonic() < end and (not keys.exists() or len(keys.read_text().splitlines()) < n):
        time.sleep(0.5)
    assert keys.exists() and len(keys.read_text().splitlines()) >= n, why()


def _assert_trained_alike(ref: tuple[Path, Path], run: tuple[Path, Path]) -> None:
    """(log dir, run dir) of an uninterrupted and a signalled + requeued run: same final weights, same batches in
    the same order (none repeated after the requeue)."""
    from safetensors.torch import load_file

    a, b = (
        load_file(ref[1] / "open_clip" / "open_clip_model.safetensors"),
        load_file(run[1] / "open_clip" / "open_clip_model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a), "requeued run ended with different weights"

    def keys(log_dir: Path) -> list:
        return [json.loads(x)["keys"] for x in (log_dir / "keys/keys_rank0.jsonl").read_text().splitlines()]

    assert keys(run[0]) == keys(ref[0])


def test_three_point_sweep_through_the_submitit_launcher(slurm, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *SMOKE,
        "hydra/launcher=slurm_cpu",
        "trainer.max_steps=2",
        "export=false",
        f"paths.log_dir={tmp_path}",
        "optimizer.lr=1e-3,2e-3,3e-3",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(tmp_path), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweeps = list((tmp_path / "smoke" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # the launcher and its 3 jobs agree on one sweep directory
    lrs = set()
    for i in range(3):
        run = sweeps[0] / str(i)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["global_step"] == 2
        lrs.add(re.search(r"lr: (\S+)", (run / "config.yaml").read_text()).group(1))
    assert lrs == {"0.001", "0.002", "0.003"}


def test_sbatch_two_tasks_ddp_smoke(slurm, tmp_path):
    job = _sbatch(
        tmp_path,
        ["--ntasks-per-node=2", "--cpus-per-task=1"],
        [
            *SMOKE,
            "trainer=ddp",
            "data.num_samples=64",
            "data.batch_size=8",
            "epochs=1",
            f"paths.log_dir={tmp_path}",
            "+callbacks.keys._target_=run_helpers.RecordKeys",
            f"+callbacks.keys.dirpath={tmp_path}/keys",
        ],
    )
    assert _wait(job, tmp_path) == "COMPLETED", _log(tmp_path, job)
    run = tmp_path / "smoke" / "runs" / job
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4  # 64 samples / (8 per device x 2 ranks)
    per_rank = [
        [json.loads(x)["keys"] for x in (tmp_path / "keys" / f"keys_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert [len(p) for p in per_rank] == [4, 4]  # both ranks took the same number of steps
    seen = [k for p in per_rank for b in p for k in b]
    assert len(seen) == len(set(seen)) == 64  # each sample exactly once across the two ranks
    assert (run / "open_clip" / "open_clip_model.safetensors").is_file()


def test_signalled_job_requeues_and_finishes_like_an_uninterrupted_one(slurm, tmp_path):
    def submit(name: str) -> str:
        d = tmp_path / name
        args = ["--ntasks-per-node=1", "--cpus-per-task=1", f"--job-name={name}"]
        return _sbatch(tmp_path, args, [*SLOW_RUN, f"paths.log_dir={d}", *_keys_file(d)])

    ref, job = submit("ref"), submit("signalled")
    _wait_for_steps(tmp_path / "signalled", 6, lambda: _log(tmp_path, job))
    subprocess.run(["scancel", "-s", "USR1", job], check=True)  # what --signal=USR1@N does before the limit
    assert _wait(job, tmp_path) == "COMPLETED", _log(tmp_path, job)
    assert _wait(ref, tmp_path) == "COMPLETED", _log(tmp_path, ref)

    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    log = _log(tmp_path, job)
    assert "Restarts=1" in info or "restart 1" in log, info + log
    run = tmp_path / "signalled" / "smoke" / "runs" / job
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and summary["global_step"] == 24
    ref_run = tmp_path / "ref" / "smoke" / "runs" / ref
    _assert_trained_alike((tmp_path / "ref", ref_run), (tmp_path / "signalled", run))


def test_submitit_job_signalled_with_usr2_is_requeued_by_submitit_and_resumes(slurm, tmp_path):
    # The sweep path: Hydra's submitit launcher owns the requeue. SIGUSR2 (what submitit asks SLURM to send
    # signal_delay_s before the limit) -> PreemptionCheckpoint writes last.ckpt at the batch boundary -> submitit's
    # handler dumps the job and runs scontrol requeue -> the same array task resumes in its run directory.
    def launch(name: str) -> subprocess.Popen:
        d = tmp_path / name
        cmd = [sys.executable, "train.py", "-m", *SLOW_RUN, "hydra/launcher=slurm_cpu", f"paths.log_dir={d}"]
        cmd += [*_keys_file(d), "optimizer.lr=1e-3"]  # a one-point sweep: one job
        out = (tmp_path / f"{name}.launcher.log").open("w")
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=_env(tmp_path))

    def launcher_log(name: str, tail: int = 3000) -> str:
        submitit_logs = "\n".join(p.read_text()[-tail:] for p in (tmp_path / name).rglob("*_log.*"))
        return (tmp_path / f"{name}.launcher.log").read_text()[-tail:] + "\n" + submitit_logs

    ref, sig = launch("ref"), launch("signalled")
    try:
        _wait_for_steps(tmp_path / "signalled", 6, lambda: launcher_log("signalled"))
        job_dirs = [
            p for p in (tmp_path / "signalled").rglob(".submitit/*") if re.fullmatch(r"\d+(_\d+)?", p.name)
        ]
        assert len(job_dirs) == 1, job_dirs
        job = job_dirs[0].name  # <array job>_<task>, or the job id of a one-point sweep
        subprocess.run(["scancel", "-s", "USR2", job], check=True)
        for name, proc in (("signalled", sig), ("ref", ref)):
            try:
                rc = proc.wait(timeout=480)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} sweep did not finish:\n{launcher_log(name)}")
            assert rc == 0, launcher_log(name)
    finally:  # a failed check must not leave the launchers waiting on jobs of a cluster that is going down
        for proc in (ref, sig):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    runs = {n: next((tmp_path / n / "smoke" / "multiruns").iterdir()) / "0" for n in ("ref", "signalled")}
    summary = json.loads((runs["signalled"] / "summary.json").read_text())
    assert summary["global_step"] == 24, summary
    assert summary["resumed_from"] == str(runs["signalled"] / "checkpoints" / "last.ckpt"), summary
    assert (
        "Restarts=1"
        in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    ), launcher_log("signalled")
    whole = launcher_log("signalled", tail=0)
    assert re.search(rf"Requeued job {job}\b", whole), whole[-3000:]  # by submitit, not by alignkit
    _assert_trained_alike((tmp_path / "ref", runs["ref"]), (tmp_path / "signalled", runs["signalled"]))


def test_up_works_after_the_daemons_were_killed(slurm):
    # What an interrupted test run leaves: the pid file lists daemons that are all dead (kill -9, no clean-up).
    # Last in this file: the cluster is restarted by the test itself.
    state = Path(os.environ.get("SLURM_CI_DIR", "/tmp/alignkit-slurm"))
    pids = [int(line.split()[1]) for line in (state / "pids").read_text().splitlines() if line.strip()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    end = time.monotonic() + 30
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    res = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "localhost_cluster: up" in res.stdout
    idle = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], capture_output=True, text=True)
    assert idle.stdout.strip() == "idle"
