"""The evaluation callback, eval entry and report without a training run: no-op, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate

from alignkit.callbacks.evaluation import FIRST_EMBEDDINGS_FILE, EvaluationCallback
from alignkit.data.evalsets import ClassificationSet, RetrievalSet
from alignkit.data.synthetic import synthetic_eval_set
from alignkit.encoders.openclip import WeightsUnavailableError
from alignkit.eval.report import load_history, render_report, save_history
from alignkit.run.evaluate import load_model


def _trainer(tmp_path: Path, step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, default_root_dir=str(tmp_path), is_global_zero=True)


def test_synthetic_eval_sets():
    cls = synthetic_eval_set("classification", per_class=2)
    assert isinstance(cls, ClassificationSet) and len(cls.images) == 36 and len(cls.classnames) == 18
    assert cls.templates[0].format(c=cls.classnames[cls.labels[8]]) == "a green circle"  # a training caption
    ret = synthetic_eval_set("retrieval", per_class=1)
    assert isinstance(ret, RetrievalSet) and len(ret.images) == 18
    assert ret.captions[0] == ["a red square", "a square that is red"]
    assert len({c for caps in ret.captions for c in caps}) == 36  # no caption shared by two images
    with pytest.raises(ValueError, match="task='detection'"):
        synthetic_eval_set("detection")


def test_no_eval_sets_means_no_work(tmp_path):
    cfg = compose_train(["+experiment=smoke", "evalsets=none"], tmp_path)
    cb = instantiate(cfg.callbacks.evaluation)
    assert isinstance(cb, EvaluationCallback) and not cb.enabled
    # pl_module=None: any attempt to evaluate would fail
    cb.on_train_start(_trainer(tmp_path, 0), None)
    cb.on_train_batch_end(_trainer(tmp_path, 100), None, None, None, 0)
    cb.on_train_end(_trainer(tmp_path, 100), None)
    assert list(tmp_path.iterdir()) == []


def test_smoke_experiment_selects_the_synthetic_sets(tmp_path):
    cb = instantiate(compose_train(["+experiment=smoke"], tmp_path).callbacks.evaluation)
    assert list(cb.evalsets) == ["shapes", "shapes_captions"] and cb.plot_set == "shapes_captions"
    assert cb.every_n_steps == 32 and cb.output_dir == tmp_path


def test_resume_keeps_history_up_to_the_resume_step(tmp_path):
    save_history(
        {0: {"val/x/s/top1": 0.1}, 3: {"val/x/s/top1": 0.2}, 6: {"val/x/s/top1": 0.3}},
        tmp_path / "metrics.json",
    )
    enc = {"image": torch.ones(2, 4), "text": torch.zeros(3, 4), "targets": torch.tensor([0, 0, 1])}
    torch.save({"step": 0, "set": "r", "task": "retrieval", **enc}, tmp_path / FIRST_EMBEDDINGS_FILE)
    sets = {"r": synthetic_eval_set("retrieval", "r")}
    cb = EvaluationCallback(sets, every_n_steps=3, output_dir=str(tmp_path))
    cb.on_train_start(_trainer(tmp_path, 3), None)  # step 3 is recorded: no evaluation (pl_module=None)
    assert sorted(cb.history) == [0, 3]  # step 6 came from weights that were never checkpointed
    first = cb.recorder.first
    assert first is not None and first[0] == 0 and torch.equal(first[1].image, enc["image"])


def test_bad_callback_inputs():
    with pytest.raises(TypeError, match=r"evalsets\.oops is a dict, not an eval set"):
        EvaluationCallback({"oops": {"_target_": "builtins.dict"}})
    sets = {"a": synthetic_eval_set("classification", "a", per_class=1)}
    with pytest.raises(ValueError, match=r"plot_set='b' is not one of the eval sets \['a'\]"):
        EvaluationCallback(sets, plot_set="b")
    with pytest.raises(ValueError, match="every_n_steps must be >= 0"):
        EvaluationCallback(sets, every_n_steps=-1)


def test_a_set_that_was_not_built_names_the_path_and_the_builder(tmp_path):
    cfg = compose_train(["evalsets=[fashion_mnist]", f"paths.data_dir={tmp_path}"], tmp_path)
    with pytest.raises(
        Exception,
        match=r"fashion_mnist: eval-set directory not found\. Build it with scripts/build_evalsets\.py",
    ):
        instantiate(cfg.callbacks.evaluation)


def _eval_cfg(overrides, out_dir):
    return compose_train(overrides, out_dir, config_name="eval")


def test_eval_entry_bad_inputs(tmp_path):
    from alignkit.run.evaluate import evaluate

    with pytest.raises(ValueError, match="no eval sets selected"):
        evaluate(_eval_cfg(["model.name=alignkit-tiny-vit"], tmp_path))
    with pytest.raises(ValueError, match=r"nothing to evaluate: pass model\.ckpt"):
        evaluate(_eval_cfg(["evalsets=synthetic"], tmp_path))
    with pytest.raises(ValueError, match=r"either model\.ckpt or model\.pretrained"):
        load_model(ckpt=str(tmp_path), pretrained="openai")
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt does not exist"):
        load_model(ckpt=str(tmp_path))
    torch.save({"state_dict": {"model.w": torch.ones(1)}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match=r"does not record its open_clip architecture; pass model\.name"):
        load_model(ckpt=str(tmp_path / "bare.ckpt"))
    with pytest.raises(ValueError, match=r"weights do not fit open_clip 'alignkit-tiny-vit'"):
        load_model(ckpt=str(tmp_path / "bare.ckpt"), name="alignkit-tiny-vit")
    torch.save(
        {"state_dict": {"model.w": torch.ones(1)}, "alignkit": {"encoder": {"kind": "towers"}}},
        tmp_path / "t.ckpt",
    )
    with pytest.raises(ValueError, match="the student is a 'towers' model"):
        load_model(ckpt=str(tmp_path / "t.ckpt"))
    assert not (tmp_path / "metrics.json").exists()


def test_offline_pretrained_tag_fails_with_instructions():
    with pytest.raises(WeightsUnavailableError, match=r"(?s)pretrained='openai'.*model\.pretrained="):
        load_model(name="ViT-B-32", pretrained="openai")


def test_report_rendering_and_history_file(tmp_path):
    assert "No evaluations were run" in render_report({})
    one = render_report({5: {"val/ret/s/i2t_r@1": 0.5, "val/gap/s/sq_per_dim": 0.0012}})
    assert "| ret/i2t_r@1 | 0.5000 | ↑ |" in one and "| gap/sq_per_dim | 1.200e-03 | ↓ |" in one
    save_history({10: {"b": 1.0, "a": 2.0}, 2: {"a": 1.0}}, tmp_path / "m.json")
    assert list(json.loads((tmp_path / "m.json").read_text())) == ["2", "10"]
    assert load_history(tmp_path / "m.json") == {2: {"a": 1.0}, 10: {"a": 2.0, "b": 1.0}}
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad\.json: not a metrics\.json"):
        load_history(tmp_path / "bad.json")


def test_autocast_dtype_reads_trainer_precision_and_eval_option_alike():
    from alignkit.eval.recorder import autocast_dtype

    assert autocast_dtype("bf16-mixed") is autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("16-mixed") is autocast_dtype("fp16") is torch.float16
    assert (
        autocast_dtype("32-true") is None
        and autocast_dtype(None) is None
        and autocast_dtype("bf16-true") is None
    )


def test_recorder_keeps_first_and_last_plot_embeddings_and_writes_the_files(tmp_path, tiny_encoder):
    from alignkit.eval.recorder import EvalRecorder

    sets = {
        "c": synthetic_eval_set("classification", "c", per_class=1),
        "r": synthetic_eval_set("retrieval", "r"),
    }
    rec = EvalRecorder(sets, batch_size=16, prefix="val/")
    assert rec.plot_set == "r"  # the first retrieval set
    enc = tiny_encoder
    m0 = rec.evaluate(enc.module, enc.tokenizer, enc.preprocess_val, step=0, device="cpu")
    with torch.no_grad():
        enc.module.visual.proj.mul_(-1.0)  # a different model: image embeddings flip sign
    m5 = rec.evaluate(enc.module, enc.tokenizer, enc.preprocess_val, step=5, device="cpu")
    assert sorted(rec.history) == [0, 5] and rec.history[0] == m0 and rec.history[5] == m5
    assert all(k.startswith("val/") for k in m0) and "val/ret/r/i2t_r@1" in m0 and "val/zs/c/top1" in m0
    assert rec.first[0] == 0 and rec.last[0] == 5
    torch.testing.assert_close(rec.last[1].image, -rec.first[1].image)
    rec.save_history(tmp_path)
    assert load_history(tmp_path / "metrics.json") == rec.history
    report = rec.write_report(tmp_path, {"run directory": str(tmp_path)})
    assert "both panels in the first step's PCA basis" in report.read_text()
    assert (tmp_path / "embeddings.png").is_file()


def test_eval_entry_rejects_an_unknown_autocast_before_loading_anything(tmp_path):
    from alignkit.run.evaluate import evaluate

    cfg = compose_train(
        ["evalsets=synthetic", "autocast=bf15", "model.name=nope"], tmp_path, config_name="eval"
    )
    with pytest.raises(ValueError, match=r"autocast='bf15' is not one of null, bf16, fp16"):
        evaluate(cfg)
