"""A short smoke run: one final checkpoint, and the hyperparameters and final metrics in wandb and TensorBoard."""

from __future__ import annotations

import pytest
import yaml
from helpers import compose_train

from alignkit.run.loggers import flat_hparams
from alignkit.run.train import train


def test_flat_hparams_dotted_keys():
    cfg = {"optimizer": {"lr": 1e-3, "betas": [0.9, 0.99]}, "seed": 1, "data": {"x": {"y": None}}}
    assert flat_hparams(cfg) == {
        "optimizer.lr": 1e-3,
        "optimizer.betas": [0.9, 0.99],
        "seed": 1,
        "data.x.y": None,
    }


def _tensorboard_hparams(log_dir) -> tuple[dict, set[str]]:
    """(hyperparameters, metric tags) of the hparams records in a TensorBoard log dir, read with tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    hparams, metrics = {}, set()
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                hparams[k] = v.number_value if v.HasField("number_value") else v.string_value
        if data.HasField("experiment"):
            metrics |= {m.name.tag for m in data.experiment.metric_infos}
    return hparams, metrics


@pytest.mark.slow
def test_two_step_smoke_one_checkpoint_and_hparams_in_loggers(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    import alignkit.run.train as train_module

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen: dict = {}
    finish = train_module.finish_loggers

    def spy(trainer):
        wandb_run = next(lg for lg in trainer.loggers if isinstance(lg, WandbLogger)).experiment
        seen.update(config=dict(wandb_run.config), summary=dict(wandb_run.summary))
        finish(trainer)

    monkeypatch.setattr(train_module, "finish_loggers", spy)
    run = tmp_path / "run"
    cfg = compose_train(
        [
            "+experiment=smoke",
            "trainer.max_steps=2",
            "logger=many",
            "data.num_samples=64",
            "optimizer.lr=0.0025",
        ],
        run,
    )
    summary = train(cfg)
    assert summary["global_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt copy

    # TensorBoard: hparams.yaml and the hparams plugin records hold the dotted config, plus the final metrics
    tb_yaml = yaml.safe_load((run / "tensorboard" / "hparams.yaml").read_text())
    assert tb_yaml["optimizer.lr"] == 0.0025 and tb_yaml["task_name"] == "smoke"
    hp, metric_tags = _tensorboard_hparams(run / "tensorboard")
    assert (
        hp["optimizer.lr"] == pytest.approx(0.0025) and hp["loss._target_"] == "alignkit.losses.WeightedLoss"
    )
    assert "val/zs/shapes/top1" in metric_tags
    # each val/* scalar once per step: the hparams record adds no second copy of the final points
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val/zs/shapes/top1")]
    assert steps and steps[-1] == 2 and len(steps) == len(set(steps)), steps

    # wandb: the run's own config and summary objects, read just before train() finishes the run
    assert seen["config"]["optimizer.lr"] == 0.0025 and seen["config"]["data.batch_size"] == 32
    assert seen["summary"]["val/zs/shapes/top1"] == pytest.approx(summary["metrics"]["val/zs/shapes/top1"])
    assert len(list((run / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # offline: for `wandb sync`

    # the run records where the loggers wrote
    assert set(summary["loggers"]) == {"wandb", "TensorBoardLogger", "CSVLogger"}
    assert "## Loggers" in (run / "report.md").read_text()


@pytest.mark.parametrize("closed", [False, True])
def test_final_metrics_reach_tensorboards_hparams_view_even_after_the_writer_closed(tmp_path, closed):
    from lightning.pytorch.loggers import TensorBoardLogger

    from alignkit.run.loggers import log_final_metrics

    lg = TensorBoardLogger(str(tmp_path), name="", version="")
    if closed:
        lg.experiment.close()  # as after Lightning's teardown: SummaryWriter.file_writer is None then
    log_final_metrics(
        [lg], {"optimizer.lr": 0.5, "seed": 3}, {"val/zs/x/top1": 0.25, "train/loss": 1.0}, step=7
    )
    lg.experiment.flush()
    hp, metric_tags = _tensorboard_hparams(tmp_path)
    assert hp == {"optimizer.lr": 0.5, "seed": 3}
    assert metric_tags == {"val/zs/x/top1"}  # only val/* metrics, by name
