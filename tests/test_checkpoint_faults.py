"""Checkpoint litter and damage: temp parts of killed writes, save_top_k across restarts, a corrupt last.ckpt,
and resume identity of architecture options."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, compose_train

from alignkit.core.checkpoint import clean_temp_parts, prune_step_checkpoints
from alignkit.run.resume import resolve_ckpt_path


def _fake_ckpt(path, step: int) -> None:
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": step}, path)


def test_corrupt_or_empty_last_ckpt_falls_back_to_the_newest_intact_step_checkpoint(tmp_path, caplog):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for step in (2, 4, 6):
        _fake_ckpt(ck / f"step{step:07d}.ckpt", step)
    data = (ck / "step0000006.ckpt").read_bytes()
    (ck / "step0000006.ckpt").write_bytes(data[: len(data) // 2])  # truncated mid-write
    (ck / "last.ckpt").write_bytes(b"")  # 0 bytes
    with caplog.at_level(logging.INFO):
        assert resolve_ckpt_path("auto", tmp_path) == str(ck / "step0000004.ckpt")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("last.ckpt is corrupt: empty file" in m for m in errors), errors
    assert any("step0000006.ckpt is corrupt: unreadable" in m for m in errors), errors
    with pytest.raises(ValueError, match=r"corrupt checkpoint: empty file .*ckpt_path=auto"):
        resolve_ckpt_path(str(ck / "last.ckpt"), tmp_path)
    (ck / "step0000004.ckpt").unlink()
    (ck / "step0000002.ckpt").unlink()
    assert resolve_ckpt_path("auto", tmp_path / "elsewhere") is None  # no checkpoints at all: a fresh start


def test_checkpoints_all_corrupt_stop_auto_naming_each_and_fresh_moves_them_aside(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _fake_ckpt(ck / "step0000006.ckpt", 6)
    data = (ck / "step0000006.ckpt").read_bytes()
    (ck / "step0000006.ckpt").write_bytes(data[:1000])  # truncate -s 1000
    (ck / "last.ckpt").write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=r"none is intact \(last.ckpt: empty file .*step0000006.ckpt: unreadable.*ckpt_path=fresh",
    ):
        resolve_ckpt_path("auto", tmp_path)
    assert resolve_ckpt_path("fresh", tmp_path) is None
    (broken,) = ck.glob("broken-*")
    assert sorted(p.name for p in broken.iterdir()) == ["last.ckpt", "step0000006.ckpt"]
    assert sorted(p.name for p in ck.glob("*.ckpt")) == []  # the new run's last.ckpt is the only one
    assert resolve_ckpt_path("auto", tmp_path) is None  # broken-*/ is not a resume candidate


def test_temp_parts_of_earlier_attempts_are_removed_and_this_attempts_kept(tmp_path):
    old, new, kept = (
        tmp_path / ".last.ckpt.abc123.tmp",
        tmp_path / ".step0000004.ckpt.def.tmp",
        tmp_path / "x.tmp",
    )
    for p in (old, new, kept):
        p.write_bytes(b"partial")
    start = time.time()
    os.utime(old, (start - 60, start - 60))
    os.utime(kept, (start - 60, start - 60))  # not a temp part of ours (no leading dot)
    os.utime(new, (start + 1, start + 1))
    assert clean_temp_parts(tmp_path, older_than=start) == [old]
    assert not old.exists() and new.exists() and kept.exists()


def test_step_checkpoints_are_pruned_to_save_top_k_by_step(tmp_path):
    names = [
        "step0000002.ckpt",
        "step0000004.ckpt",
        "step0000006.ckpt",
        "step0000006-v1.ckpt",
        "step0000008.ckpt",
    ]
    for n in [*names, "last.ckpt", "other.ckpt"]:
        (tmp_path / n).write_bytes(b"x")
    removed = prune_step_checkpoints(tmp_path, "step", keep=1, current_step=6)
    assert sorted(p.name for p in removed) == sorted(set(names) - {"step0000006-v1.ckpt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "other.ckpt", "step0000006-v1.ckpt"]


@pytest.mark.parametrize("layout", ["schema1", "unversioned"])
def test_resume_refuses_a_changed_architecture_option(tmp_path, tiny_encoder, layout):
    from alignkit.core.checkpoint import run_section
    from alignkit.losses import InfoNCE
    from alignkit.modules.clip_refine import AlignModule
    from alignkit.run.checkpointing import check_checkpoint_compatible, run_identity

    module = AlignModule(tiny_encoder, InfoNCE(), optimizer=torch.optim.AdamW)
    saved_cfg = compose_train(["+experiment=smoke"], tmp_path)
    sd = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    path = tmp_path / "run.ckpt"
    identity = run_identity(
        saved_cfg
    )  # the unversioned layout: the bare identity dict of earlier checkpoints
    torch.save(
        {"state_dict": sd, "alignkit_run": run_section(identity) if layout == "schema1" else identity}, path
    )
    check_checkpoint_compatible(path, module, saved_cfg)  # the same settings resume
    moved = compose_train(["+experiment=smoke", "encoder.cache_dir=/elsewhere"], tmp_path)
    check_checkpoint_compatible(path, module, moved)  # a cache location is not the architecture
    changed = compose_train(["+experiment=smoke", "encoder.force_quick_gelu=true"], tmp_path)
    with pytest.raises(ValueError, match=r"encoder\.force_quick_gelu: checkpoint False vs this run True"):
        check_checkpoint_compatible(path, module, changed)


def _cli(tmp_path, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    args = [
        "+experiment=smoke",
        "evalsets=none",
        "data.num_samples=256",
        "epochs=1",  # 8 steps of 32
        "callbacks.checkpoint.every_n_train_steps=2",
        f"paths.log_dir={tmp_path}",
        "run_id=kill",
        *extra,
    ]
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("damage_last", [False, True])
def test_after_kill_9_mid_write_the_next_attempt_leaves_no_litter_and_resumes(tmp_path, caplog, damage_last):
    # Attempt 1 is killed while writing last.ckpt at step 4 (saves: step 2, last 2, step 4, last 4 <- kill): a
    # temp part is left, and step0000004.ckpt is newer than the last.ckpt (step 2) the next attempt resumes.
    first = _cli(tmp_path, ["+callbacks.kill._target_=run_helpers.KillDuringSave", "+callbacks.kill.nth=4"])
    assert first.returncode == -9, first.stderr[-2000:]
    run = tmp_path / "smoke" / "runs" / "kill"
    ck = run / "checkpoints"
    assert list(ck.glob(".last.ckpt.*.tmp")), sorted(p.name for p in ck.iterdir())  # the litter is there
    assert torch.load(ck / "last.ckpt", weights_only=False)["global_step"] == 2
    if damage_last:
        (ck / "last.ckpt").write_bytes(b"")

    from alignkit.run.train import train

    overrides = ["+experiment=smoke", "evalsets=none", "data.num_samples=256", "epochs=1"]
    cfg = compose_train([*overrides, "callbacks.checkpoint.every_n_train_steps=2"], run)
    with caplog.at_level(logging.INFO):
        summary = train(cfg)
    resumed = ck / ("step0000004.ckpt" if damage_last else "last.ckpt")
    assert summary["resumed_from"] == str(resumed) and summary["global_step"] == 8
    if damage_last:
        assert any("last.ckpt is corrupt: empty file" in r.getMessage() for r in caplog.records)
    assert not [p.name for p in ck.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step0000008.ckpt"]  # save_top_k=1
