"""Per-step diagnostics are logged only on the steps the loggers write (a speed-up, see BENCHMARKS.md): the CSV
must hold exactly the same rows and columns as when every step logged everything."""

from __future__ import annotations

import csv

from helpers import compose_train

from alignkit.run.train import train


def test_diagnostics_are_logged_on_every_step_the_logger_writes(tmp_path):
    cfg = compose_train(
        [
            "+experiment=smoke",
            "trainer.max_steps=7",
            "trainer.log_every_n_steps=3",
            "trainer.accumulate_grad_batches=2",
            "callbacks.checkpoint=null",
        ],
        tmp_path,
    )
    summary = train(cfg)
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [2, 5]  # Lightning writes at (step + 1) % 3 == 0
    for r in logged:
        for key in ("train/modality_gap", "train/loss_rafa", "train/loss_hycd", "data/batch_global"):
            assert r[key] != "", (key, r)
        # smoke: 32 per device, 1 device, accumulation 2 -> 64 samples per optimizer step
        assert (float(r["data/batch_per_device"]), float(r["data/batch_global"])) == (32.0, 64.0)
    # the final step's diagnostics reach callback_metrics (the run summary) even off the logging grid
    assert {"train/loss", "train/modality_gap", "train/loss_hycd"} <= set(summary["metrics"])
