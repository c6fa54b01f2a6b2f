"""localhost_cluster.sh's bookkeeping without a cluster: ``down`` with daemons that already died."""

from __future__ import annotations

import subprocess
import time

import pytest
from helpers import REPO

CLUSTER = REPO / "scripts" / "slurm" / "localhost_cluster.sh"


@pytest.mark.slow
def test_down_stops_live_daemons_and_forgets_dead_ones(tmp_path):
    # The state an interrupted test run leaves: one daemon still running, the last one listed already dead.
    live = subprocess.Popen(["sleep", "300"])
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    try:
        (tmp_path / "pids").write_text(f"sleep {live.pid}\nslurmd {dead.pid}\n")
        env = {"SLURM_CI_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}  # no scontrol: nothing to cancel
        res = subprocess.run(
            ["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, (res.stdout, res.stderr)
        assert "stopped" in res.stdout
        assert not (tmp_path / "pids").exists()
        end = time.monotonic() + 10
        while live.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert live.poll() is not None, "the live daemon was not stopped"
    finally:
        if live.poll() is None:
            live.kill()
        live.wait()


def test_a_failing_step_says_which_command_failed(tmp_path):
    # `up` as a non-root user stops with its own message; any other failure names the command (ERR trap).
    script = tmp_path / "fail.sh"
    body = CLUSTER.read_text().split('case "${1:-}" in')[0]
    script.write_text(body + "\nbash -c 'exit 3' failing-step\necho not reached\n")
    env = {"SLURM_CI_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 3 and "not reached" not in res.stdout
    assert "failed (exit 3)" in res.stderr and "failing-step" in res.stderr
