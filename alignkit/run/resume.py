"""Which checkpoint a training run resumes (``ckpt_path``), and the run directory's lock.

* ``ckpt_path=auto``: ``last.ckpt``, else the newest intact step checkpoint; when checkpoints exist and none is
  intact the run stops naming each file and why (a silent restart would write next to the broken files forever).
* ``ckpt_path=fresh``: start over, the broken files moved into ``checkpoints/broken-<UTC time>/``.
* :class:`RunDirLock`: one run per run directory (``fcntl.flock`` on ``<run dir>/.lock``, held by global rank 0).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from alignkit.core.checkpoint import LAST, checkpoint_problem, newest_intact_checkpoint, step_checkpoints

log = logging.getLogger(__name__)


def broken_checkpoints(folder: Path, step_prefix: str) -> list[tuple[Path, str]]:
    """Every resume candidate of ``folder`` (``last.ckpt``, the step files) that is not intact, with why."""
    candidates = [folder / LAST] + [p for *_, p in step_checkpoints(folder, step_prefix)]
    found = [(c, checkpoint_problem(c)) for c in candidates if c.is_file()]
    return [(c, why) for c, why in found if why is not None]


def move_aside_broken(folder: Path, step_prefix: str) -> Path | None:
    """``ckpt_path=fresh``: move the broken resume candidates into ``<folder>/broken-<UTC time>/`` (kept for a
    post-mortem, out of the way of the new run's ``last.ckpt``); intact ones are left in place (the new run's
    first saves replace them)."""
    broken = broken_checkpoints(folder, step_prefix)
    if not broken:
        return None
    dest = folder / f"broken-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    dest.mkdir(parents=True, exist_ok=True)
    for path, why in broken:
        log.warning("ckpt_path=fresh: moving corrupt %s (%s) to %s", path.name, why, dest)
        path.rename(dest / path.name)
    return dest


def resolve_ckpt_path(
    ckpt_path: str | None, run_dir: str | Path, ckpt_dir: str | Path | None = None, step_prefix: str = "step"
) -> str | None:
    """What training resumes. ``auto`` → :func:`newest_intact_checkpoint` of ``ckpt_dir`` (default
    ``<run_dir>/checkpoints``), else start fresh; an explicit path must exist and be intact."""
    if ckpt_path in (None, "", "null", "none"):
        return None
    folder = Path(ckpt_dir) if ckpt_dir else Path(run_dir) / "checkpoints"
    if ckpt_path == "fresh":
        move_aside_broken(folder, step_prefix)
        return None
    if ckpt_path == "auto":
        found = newest_intact_checkpoint(folder, step_prefix)
        if found is not None:
            log.info("resuming from %s", found)
            return str(found)
        broken = broken_checkpoints(folder, step_prefix)
        if broken:  # checkpoints exist and none is intact: never restart silently over them
            listing = "; ".join(f"{p.name}: {why}" for p, why in broken)
            raise ValueError(
                f"ckpt_path=auto found checkpoints in {folder} but none is intact ({listing}). Restore one, give "
                f"ckpt_path=PATH, or start over with ckpt_path=fresh (moves the broken files to {folder}/broken-<time>/)"
            )
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist (use ckpt_path=auto to resume the run directory)"
        )
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is a corrupt checkpoint: {problem}. Give another checkpoint, or "
            f"ckpt_path=auto to resume from the newest intact one of the run directory"
        )
    return str(ckpt_path)


LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.lock`` for the run's life, with the holder's PID and host
    written in the file. The kernel drops the lock with the process (any exit, ``kill -9`` included), so a stale
    lock file never blocks a resume or a SLURM requeue of the same job. Taken by global rank 0 only: one lock per
    run directory, also on a filesystem shared by several nodes (flock on NFS v4 / Lustre is forwarded to the
    server). A second run on the same directory stops at once naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise RunDirLockedError(
                f"another run is using {self.path.parent} ({holder}, lock file {self.path}). Wait for it to end, "
                f"stop it, or give this run its own directory (run_id=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
