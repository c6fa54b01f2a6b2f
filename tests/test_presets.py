"""Trainer and launcher presets compose, and read the cluster shape from SLURM."""

from __future__ import annotations

import pytest
from helpers import compose_train
from hydra.utils import instantiate


@pytest.mark.parametrize(
    "preset, devices, nodes, precision",
    [
        ("cpu", 1, 1, "32-true"),
        ("gpu", 1, 1, "bf16-mixed"),
        ("ddp", 2, 1, None),  # None: ${ak_precision:}, whatever this machine supports
        ("fsdp", 1, 1, "bf16-mixed"),
        ("multinode", 8, 2, "bf16-mixed"),
    ],
)
def test_trainer_presets_compose(preset, devices, nodes, precision, monkeypatch):
    from alignkit.run.cluster import default_precision

    for var in (
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
        "SLURM_NNODES",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
    ):
        monkeypatch.delenv(var, raising=False)  # outside an allocation: the presets' own defaults
    cfg = compose_train(["+experiment=smoke", f"trainer={preset}"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (devices, nodes)
    assert cfg.trainer.precision == (precision or default_precision())


def test_fsdp_wraps_open_clip_blocks_so_the_teacher_is_sharded_like_the_student():
    import open_clip.transformer as oct

    cfg = compose_train(["+experiment=smoke", "trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # a ModuleWrapPolicy over open_clip's residual blocks
    assert oct.ResidualAttentionBlock in policy._module_classes
    assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "full"


def test_plugins_switch_lightning_auto_requeue_off_inside_slurm(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from alignkit.core.checkpoint import AtomicCheckpointIO
    from alignkit.run.cluster import trainer_plugins

    for k in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert [type(p) for p in trainer_plugins()] == [AtomicCheckpointIO]
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    envs = [p for p in trainer_plugins() if isinstance(p, SLURMEnvironment)]
    assert len(envs) == 1 and envs[0].auto_requeue is False


@pytest.mark.parametrize("launcher", ["slurm", "slurm_multinode", "slurm_cpu"])
def test_slurm_launcher_presets_compose(launcher):
    from hydra import compose, initialize_config_dir

    from alignkit.run.train import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(
            config_name="train",
            overrides=["+experiment=smoke", f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.partition == "gpu" and launcher_cfg.max_num_timeout > 0
    assert launcher_cfg.signal_delay_s < launcher_cfg.timeout_min * 60


def _in_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")


@pytest.mark.parametrize(
    "plugins, owners",
    [
        ("default", 1),  # the preset switches Lightning's requeue off: alignkit's callback is the one owner
        ("none", 2),  # no ClusterEnvironment given: Lightning detects SLURM with auto_requeue=True
        ("lightning_requeue", 2),  # a user's SLURMEnvironment() left at its default
    ],
)
def test_build_refuses_two_requeue_owners_under_slurm(plugins, owners, monkeypatch, tmp_path):
    from alignkit.run.build import build_run

    _in_slurm(monkeypatch)
    slurm_env = "{_target_: lightning.fabric.plugins.environments.SLURMEnvironment}"
    override = {
        "default": [],
        "none": ["trainer.plugins=null"],
        "lightning_requeue": ["~trainer.plugins", f"+trainer.plugins=[{slurm_env}]"],
    }[plugins]
    cfg = compose_train(
        [
            "+experiment=smoke",
            f"paths.output_dir={tmp_path}",
            "trainer.devices=1",
            "trainer.num_nodes=1",
            *override,
        ]
    )
    if owners == 1:
        run = build_run(cfg, prepare=False, loggers=False)
        assert run.trainer.strategy is not None
    else:
        with pytest.raises(ValueError, match="two requeue owners"):
            build_run(cfg, prepare=False, loggers=False)
        # a run without alignkit's requeue (callbacks.preemption.requeue=none) may keep Lightning's
        cfg = compose_train(
            [
                "+experiment=smoke",
                f"paths.output_dir={tmp_path}",
                "trainer.devices=1",
                "trainer.num_nodes=1",
                *override,
                "callbacks.preemption.requeue=none",
            ]
        )
        build_run(cfg, prepare=False, loggers=False)
