"""open_clip hub-layout exports: a fresh process loads them with ``local-dir:`` after the directory is moved."""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
from helpers import load_in_fresh_process

from alignkit.core.hub import CONFIG_NAME, WEIGHTS_NAME, write_open_clip_dir
from alignkit.encoders.openclip import OpenCLIPEncoder, register_shipped_configs
from alignkit.run.export import export_checkpoint, main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory as train() leaves it: a checkpoint of a perturbed tiny CLIP, config.yaml, metrics.json."""
    register_shipped_configs()
    torch.manual_seed(0)
    student = open_clip.create_model("alignkit-tiny-vit")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pre = dict(student.visual.preprocess_cfg, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    spec = {"kind": "open_clip", "model": "alignkit-tiny-vit", "pretrained": None, "force_quick_gelu": True}
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    ckpt = {
        "state_dict": {"model." + k: v for k, v in student.state_dict().items()},
        "alignkit": {"encoder": {**spec, "preprocess": pre}},
    }
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("task_name: smoke\noptimizer:\n  lr: 0.001\ndata:\n  num_samples: 512\n")
    (run / "metrics.json").write_text(
        json.dumps({"0": {"val/zs/a/top1": 0.25}, "64": {"val/zs/a/top1": 0.75}})
    )
    # the reference: the same weights built the way training built them (QuickGELU on)
    ref = open_clip.create_model("alignkit-tiny-vit", force_quick_gelu=True)
    ref.load_state_dict(student.state_dict())
    return run, ref.eval()


@pytest.mark.slow
def test_cli_export_loads_in_a_fresh_process_after_a_move(tiny_run, tmp_path):
    run, ref = tiny_run
    out = tmp_path / "export"
    main([str(run), str(out)])
    assert {CONFIG_NAME, WEIGHTS_NAME, "README.md"} <= set(os.listdir(out))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["quick_gelu"] is True  # the trained activation travels with the config
    card = (out / "README.md").read_text()
    assert "library_name: open_clip" in card and "alignkit-tiny-vit" in card
    assert "| `val/zs/a/top1` | 0.2500 | 0.7500 | +0.5000 |" in card  # before/after from metrics.json
    assert "`optimizer.lr`: 0.001" in card
    res = load_in_fresh_process(out, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(res["image"], ref.encode_image(res["images"]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res["text"], ref.encode_text(res["tokens"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res["mean"], torch.tensor([0.5, 0.4, 0.3]))  # the run's preprocess


def test_encoder_node_takes_an_export_directory(tiny_run, tmp_path):
    run, ref = tiny_run
    out = export_checkpoint(run, tmp_path / "export")
    # the default config's pretrained tag is ignored: the directory holds the weights
    enc = OpenCLIPEncoder(model=f"local-dir:{out}", pretrained="openai")
    assert enc.spec["pretrained"] is None and enc.spec["preprocess"]["mean"] == [0.5, 0.4, 0.3]
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(enc.module.state_dict()[k], v)
    assert enc.tokenizer(["a b"]).shape == (1, 16)
    with pytest.raises(FileNotFoundError, match="not an open_clip export directory"):
        OpenCLIPEncoder(model=f"local-dir:{tmp_path}", pretrained=None)


def test_absolute_paths_are_refused(tmp_path):
    cfg = {"embed_dim": 4, "text_cfg": {"hf_model_name": str(tmp_path / "bert")}, "vision_cfg": {}}
    with pytest.raises(ValueError, match=r"absolute paths \(text_cfg\.hf_model_name="):
        write_open_clip_dir(tmp_path / "x", {"w": torch.ones(1)}, cfg, {}, "card")
    assert not (tmp_path / "x" / WEIGHTS_NAME).exists()


def test_a_student_open_clip_cannot_build_fails_clearly(tmp_path):
    torch.save(
        {"state_dict": {"model.w": torch.ones(1)}, "alignkit": {"encoder": {"kind": "x"}}},
        tmp_path / "a.ckpt",
    )
    with pytest.raises(ValueError, match="does not record an open_clip student"):
        export_checkpoint(tmp_path / "a.ckpt", tmp_path / "out")


@pytest.mark.slow
def test_offline_effnet_minilm_export_loads_in_a_fresh_process(tmp_path, monkeypatch):
    """The STRUCTURE export of the offline encoders (EfficientNet-Lite0 + all-MiniLM-L6-v2): the text tower is
    named by its hub id, and the export makes that id resolvable offline in the Hugging Face cache."""
    from alignkit.encoders.aligned import AlignedDualEncoder, export_open_clip
    from alignkit.encoders.frozen_towers import FrozenTowers
    from alignkit.encoders.heads import LinearHead
    from alignkit.encoders.hub_cache import MINILM_HUB_ID

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    towers = FrozenTowers({"kind": "effnet_lite0_offline"}, {"kind": "minilm_offline"}, context_length=32)
    torch.manual_seed(0)
    model = AlignedDualEncoder(
        towers, towers.vision.num_layers - 1, towers.text.num_layers - 1,
        LinearHead(1280, 64), LinearHead(384, 64, bias=False), temperature=0.05,
    ).eval()  # fmt: skip
    out = export_open_clip(model, tmp_path / "export")
    cfg = json.loads((out / CONFIG_NAME).read_text())["model_cfg"]
    assert cfg["text_cfg"]["hf_model_name"] == MINILM_HUB_ID
    assert str(tmp_path) not in (out / CONFIG_NAME).read_text()
    res = load_in_fresh_process(out, tmp_path, {"HF_HUB_CACHE": str(tmp_path / "hf")})
    with torch.no_grad():
        torch.testing.assert_close(res["image"], model.encode_image(res["images"]), atol=1e-4, rtol=1e-4)
        ours = model.encode_text(towers.tokenizer(["a red square", "a dog on grass", "x"]))
        torch.testing.assert_close(res["text"], ours, atol=1e-4, rtol=1e-4)
