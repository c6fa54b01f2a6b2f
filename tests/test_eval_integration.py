"""A real (tiny) training run with the evaluation callback, then eval.py and export on its outputs.

One run is shared by the tests of this file: smoke experiment, 8 steps, eval every 3 steps
(-> evaluations at steps 0, 3, 6 and 8) on the in-memory synthetic eval sets.
"""

from __future__ import annotations

import csv
import json
import logging

import lightning as L
import open_clip
import pytest
import torch
from helpers import compose_train
from PIL import Image

from alignkit.cli import main as cli_main
from alignkit.data.synthetic import synthetic_eval_set
from alignkit.eval.encode import evaluate_sets
from alignkit.run.evaluate import evaluate
from alignkit.run.train import train

STEPS = (0, 3, 6, 8)
KEYS = ("val/zs/shapes/top1", "val/ret/shapes_captions/i2t_r@1", "val/gap/shapes_captions/l2")


class KeepModule(L.Callback):
    """Test helper: keeps the trained LightningModule object so the test can compare against it."""

    module = None

    def on_train_end(self, trainer, pl_module):
        KeepModule.module = pl_module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(
        [
            "+experiment=smoke",
            "data.num_samples=128",
            "epochs=2",  # 128 / 32 = 4 steps per epoch -> 8 steps
            "callbacks.evaluation.every_n_steps=3",
            "trainer.log_every_n_steps=1",
            "+callbacks.keep._target_=test_eval_integration.KeepModule",
        ],
        run_dir,
    )
    summary = train(cfg)
    assert summary["global_step"] == 8
    return run_dir, summary, KeepModule.module


def _eval_cfg(overrides, out_dir):
    return compose_train(overrides, out_dir, config_name="eval")


def test_callback_evaluates_before_periodically_and_at_the_end(run):
    run_dir, summary, module = run
    history = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(map(int, history)) == list(STEPS)
    for step in STEPS:
        assert set(KEYS) <= set(history[str(step)])
        assert len(history[str(step)]) == 3 + 6 + 7  # zs: top1/top5/mpcr; ret: 2x3 recalls; gap: 7
    # training moved the embeddings: the gap is not what it was before training
    assert history["8"]["val/gap/shapes_captions/l2"] != pytest.approx(
        history["0"]["val/gap/shapes_captions/l2"]
    )
    # step 0 really is "before": it equals the frozen teacher, a copy of the starting weights
    sets = {
        "shapes": synthetic_eval_set("classification", "shapes", 5, 32, 12345),
        "shapes_captions": synthetic_eval_set("retrieval", "shapes_captions", 1, 32, 54321),
    }
    _, tok, pre = module.eval_interface()
    before, _ = evaluate_sets(module.teacher, tok, pre, sets)
    for k, v in before.items():
        assert history["0"]["val/" + k] == pytest.approx(v, abs=1e-6), k
    # and the end-of-training entry is the trained student
    after, _ = evaluate_sets(module.model, tok, pre, sets)
    for k, v in after.items():
        assert history["8"]["val/" + k] == pytest.approx(v, abs=1e-6), k
    # the final values reach trainer.callback_metrics, hence the run summary
    for k in KEYS:
        assert summary["metrics"][k] == pytest.approx(history["8"][k])


def test_callback_logs_to_the_lightning_logger(run):
    run_dir, _, _ = run
    history = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get(KEYS[0])]
    assert [int(r["step"]) for r in rows] == list(STEPS)
    for r in rows:
        for k in KEYS:
            assert float(r[k]) == pytest.approx(history[r["step"]][k])


def test_report_and_embedding_plot(run):
    run_dir, _, _ = run
    history = json.loads((run_dir / "metrics.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert "| metric | before (step 0) | after (step 8) | change | better |" in report
    assert "## shapes\n" in report and "## shapes_captions\n" in report
    a, b = history["0"]["val/zs/shapes/top5"], history["8"]["val/zs/shapes/top5"]
    assert f"| zs/top5 | {a:.4f} | {b:.4f} | {b - a:+.4f} | ↑ |" in report
    assert "| gap/l2 |" in report and "![2-D PCA" in report
    with Image.open(run_dir / "embeddings.png") as png:
        assert png.format == "PNG" and png.width > 1.6 * png.height  # two panels: before | after
    first = torch.load(run_dir / "embeddings_first.pt", weights_only=True)
    assert first["step"] == 0 and first["set"] == "shapes_captions" and first["image"].shape == (18, 64)


def test_eval_py_on_the_checkpoint_matches_the_end_of_training_evaluation(run, tmp_path):
    run_dir, _, _ = run
    history = json.loads((run_dir / "metrics.json").read_text())
    result = evaluate(_eval_cfg([f"model.ckpt={run_dir}", "evalsets=synthetic"], tmp_path / "ev"))
    assert result["step"] == 8
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(written) == ["8"] and set(written["8"]) == set(history["8"])
    for k, v in history["8"].items():
        assert written["8"][k] == pytest.approx(v, abs=1e-6), k
    assert "| metric | step 8 | better |" in (tmp_path / "ev" / "report.md").read_text()
    assert (tmp_path / "ev" / "embeddings.png").is_file()
    # the exported open_clip directory evaluated as an open_clip model gives the same numbers again
    from_file = evaluate(
        _eval_cfg([f"model.name=local-dir:{run_dir / 'open_clip'}", "evalsets=synthetic"], tmp_path / "ev2")
    )
    for k, v in history["8"].items():
        assert from_file["metrics"][k] == pytest.approx(v, abs=1e-6), k


def _embed(model, tokenizer, preprocess):
    s = synthetic_eval_set("retrieval", "x", 1, 32, 7)
    images = torch.stack([preprocess(im) for im in s.images])
    tokens = tokenizer([c[0] for c in s.captions])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_export_at_the_end_of_training_loads_in_open_clip(run, tmp_path, caplog):
    run_dir, summary, module = run
    exported = run_dir / "open_clip"
    assert summary["exported"] == str(exported)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    weights = exported / "open_clip_model.safetensors"
    result = model.load_state_dict(open_clip.factory.load_state_dict(str(weights)), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    trained, tok, pre = module.eval_interface()
    img_t, txt_t = _embed(trained, tok, pre)
    img_r, txt_r = _embed(model, open_clip.get_tokenizer(f"local-dir:{exported}"), preprocess)
    torch.testing.assert_close(img_r, img_t, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(txt_r, txt_t, atol=1e-6, rtol=1e-5)
    img_teacher, _ = _embed(module.teacher, tok, pre)
    assert not torch.allclose(img_r, img_teacher, atol=1e-4)  # the student, not the starting model
    config = json.loads((exported / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == [32, 32] and config["model_cfg"]["embed_dim"] == 64
    history = json.loads((run_dir / "metrics.json").read_text())
    top1 = "val/zs/shapes/top1"
    assert (
        f"| `{top1}` | {history['0'][top1]:.4f} | {history['8'][top1]:.4f} |"
        in (exported / "README.md").read_text()
    )


def test_alignkit_export_cli_on_the_run_directory(run, tmp_path):
    from safetensors.torch import load_file

    run_dir, _, _ = run
    cli_main(["export", str(run_dir), str(tmp_path / "cli.safetensors")])
    a, b = (
        load_file(str(tmp_path / "cli.safetensors")),
        load_file(str(run_dir / "open_clip" / "open_clip_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # last.ckpt = final weights
    assert json.loads((tmp_path / "cli.json").read_text())["architecture"] == "alignkit-tiny-vit"
