"""Cluster shape from the environment (SLURM) and start-up checks (the checkpoint guard is in checkpointing.py).

* :func:`slurm_value` backs the ``${ak_slurm:...}`` resolver the trainer presets use, so ``devices`` and
  ``num_nodes`` come from the allocation instead of being typed twice.
* :func:`check_trainer_matches_slurm` fails at start, naming the value to change, when a preset disagrees with the
  allocation (otherwise DDP waits forever for ranks that never start, or Lightning reports it deep in setup).
* :func:`trainer_plugins` gives the trainer atomic checkpoint writes and, under SLURM, a ``SLURMEnvironment`` with
  Lightning's auto-requeue **off**: alignkit's PreemptionCheckpoint (sbatch) or submitit (launcher) owns the requeue;
  :func:`check_one_requeue_owner` fails at start when a user's ``trainer.plugins`` would switch it back on.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def _tasks_per_node() -> int | None:
    if os.environ.get("SLURM_NTASKS_PER_NODE"):
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    tpn = os.environ.get("SLURM_TASKS_PER_NODE")  # e.g. "2(x3)" or "2,1"
    if tpn:
        m = re.match(r"(\d+)", tpn)
        return int(m.group(1)) if m else None
    return None


def in_slurm_job() -> bool:
    """A batch/srun task of a SLURM job (not an interactive shell on a login node)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_value(name: str, default: Any = None) -> Any:
    """``tasks_per_node``, ``nodes``, ``ntasks`` or ``job_id`` of the current SLURM allocation, else ``default``."""
    if not in_slurm_job():
        return default
    if name == "tasks_per_node":
        v = _tasks_per_node()
    elif name == "nodes":
        v = int(os.environ["SLURM_NNODES"]) if "SLURM_NNODES" in os.environ else None
    elif name == "ntasks":
        v = int(os.environ["SLURM_NTASKS"])
    elif name == "job_id":
        v = os.environ.get("SLURM_JOB_ID")
    else:
        raise ValueError(f"ak_slurm: unknown field {name!r} (tasks_per_node, nodes, ntasks, job_id)")
    return default if v is None else v


def sweep_id() -> str:
    """One id per sweep, the same in the launcher and in every job it submits (jobs inherit the environment)."""
    if "ALIGNKIT_SWEEP_ID" not in os.environ:
        os.environ["ALIGNKIT_SWEEP_ID"] = time.strftime("%Y-%m-%d_%H-%M-%S")
    return os.environ["ALIGNKIT_SWEEP_ID"]


def default_precision() -> str:
    """``bf16-mixed`` on a GPU that supports it, else ``32-true`` (CPU runs stay exact)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def strategy_for(devices: Any, num_nodes: Any) -> str:
    """``auto`` on one device; else DDP that tolerates parameters outside the loss graph (see configs/trainer/ddp.yaml)."""
    one = str(devices) in ("1", "auto") and str(num_nodes) == "1"
    return "auto" if one else "ddp_find_unused_parameters_true"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ak_strategy"):
        OmegaConf.register_new_resolver("ak_strategy", strategy_for)
    if not OmegaConf.has_resolver("ak_precision"):
        OmegaConf.register_new_resolver("ak_precision", default_precision)
    if not OmegaConf.has_resolver("ak_slurm"):
        OmegaConf.register_new_resolver("ak_slurm", slurm_value)
    if not OmegaConf.has_resolver("ak_sweep_id"):
        OmegaConf.register_new_resolver("ak_sweep_id", sweep_id)


register_resolvers()


def check_trainer_matches_slurm(trainer_cfg: DictConfig | dict) -> None:
    """Under SLURM, ``trainer.devices`` must equal the tasks per node and ``trainer.num_nodes`` the node count."""
    if not in_slurm_job():
        return
    tpn, nodes = _tasks_per_node(), int(os.environ.get("SLURM_NNODES", "1"))
    devices, num_nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    problems = []
    if tpn is not None and isinstance(devices, int) and devices != tpn:
        problems.append(
            f"trainer.devices={devices} but SLURM runs {tpn} task(s) per node: set trainer.devices={tpn} "
            f"(or submit with --ntasks-per-node={devices}; one task per GPU)"
        )
    if num_nodes != nodes:
        problems.append(
            f"trainer.num_nodes={num_nodes} but the allocation has {nodes} node(s): set trainer.num_nodes={nodes} "
            f"(or submit with --nodes={num_nodes})"
        )
    if problems:
        raise ValueError("trainer preset disagrees with the SLURM allocation:\n  " + "\n  ".join(problems))


def planned_world_size(trainer_cfg: DictConfig | dict) -> int:
    """Processes taking part in one step (devices per node × nodes), resolved from the trainer config before the
    Trainer exists, so the batch plan (and ``max_steps``) can be passed to its constructor.

    Resolved the way Lightning's Trainer does (2.6.6 checked): ``accelerator="auto"`` picks MPS, then CUDA, else
    CPU (``"gpu"``: MPS, else CUDA); ``devices="auto"`` is the accelerator's ``auto_device_count()``, anything else
    its ``parse_devices`` → ``get_parallel_devices``; a parallel strategy's world size is ``num_nodes`` × that device
    count (``ParallelStrategy.world_size``). Under SLURM, ``devices`` / ``num_nodes`` come from the allocation
    through the ``${ak_slurm:...}`` resolver and :func:`check_trainer_matches_slurm` holds them to it.
    ``alignkit.run.build`` checks the answer against the built Trainer's ``world_size``.
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    flag = trainer_cfg.get("accelerator", "auto") or "auto"
    if not isinstance(flag, str):  # an Accelerator instance
        accelerator = flag
    else:
        name = flag.lower()
        if name in ("auto", "gpu"):
            if MPSAccelerator.is_available():
                name = "mps"
            elif CUDAAccelerator.is_available():
                name = "cuda"
            else:
                name = "cpu"  # "gpu" without one: the Trainer itself refuses, naming the problem
        accelerator = AcceleratorRegistry.get(name)
    devices = trainer_cfg.get("devices", "auto")
    if devices == "auto":
        count = accelerator.auto_device_count()
    else:
        count = len(accelerator.get_parallel_devices(accelerator.parse_devices(devices)))
    return max(1, count) * int(trainer_cfg.get("num_nodes", 1) or 1)


def trainer_plugins() -> list:
    """Atomic checkpoint I/O, plus SLURMEnvironment(auto_requeue=False) inside a SLURM job."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from alignkit.core.checkpoint import AtomicCheckpointIO

    plugins: list = [AtomicCheckpointIO()]
    if in_slurm_job() and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def lightning_requeues(plugins: Any) -> bool:
    """Whether a Trainer given ``plugins`` would requeue the job itself on SIGUSR1 (Lightning's SLURM auto-requeue).

    Decided from the plugins, before the Trainer exists, the way Lightning 2.6 chooses its cluster environment: a
    ``ClusterEnvironment`` plugin is used as given; without one, a detected SLURM job gets ``SLURMEnvironment()``,
    whose ``auto_requeue`` defaults to True."""
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    given = [p for p in (plugins if isinstance(plugins, (list, tuple)) else [plugins]) if p is not None]
    envs = [p for p in given if isinstance(p, ClusterEnvironment)]
    if envs:
        return isinstance(envs[0], SLURMEnvironment) and envs[0].auto_requeue
    return SLURMEnvironment.detect()


def check_one_requeue_owner(plugins: Any, callbacks: list) -> None:
    """Fail before the Trainer is built when Lightning's auto-requeue and alignkit's preemption callback would both
    requeue the job (two requeues of one job: the second resubmission races the first's checkpoint)."""
    from alignkit.callbacks.preemption import PreemptionCheckpoint

    ours = [cb for cb in callbacks if isinstance(cb, PreemptionCheckpoint) and cb.requeue != "none"]
    if ours and lightning_requeues(plugins):
        raise ValueError(
            "two requeue owners: Lightning's SLURMEnvironment(auto_requeue=True) and alignkit's "
            "PreemptionCheckpoint. Keep the trainer preset's plugins (alignkit.run.cluster.trainer_plugins, which "
            "switches Lightning's off) or set callbacks.preemption.requeue=none"
        )


def module_classes(paths: list[str]) -> set[type]:
    """Import ``module.Class`` paths into the set FSDPStrategy takes as ``auto_wrap_policy``."""
    from hydra.utils import get_class

    return {get_class(p) for p in paths}
