"""Export round trip: Lightning-style checkpoint -> plain open_clip state dict -> open_clip loads it."""

import json
import logging

import open_clip
import pytest
import torch

from alignkit.core.checkpoint import extract_state_dict
from alignkit.encoders.openclip import register_shipped_configs
from alignkit.run.export import export_checkpoint, main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny open_clip 'student' with perturbed weights and a Lightning-style checkpoint holding it."""
    register_shipped_configs()  # the 3.4M-parameter CLIP shipped in alignkit/model_configs
    torch.manual_seed(0)
    teacher = open_clip.create_model("alignkit-tiny-vit")
    student = open_clip.create_model("alignkit-tiny-vit")
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "training" moved every weight
    state = {"model." + k: v for k, v in student.state_dict().items()}
    state.update({"teacher." + k: v for k, v in teacher.state_dict().items()})
    state["loss_fn.prior_mean"] = torch.zeros(3)  # a non-model buffer that must be dropped
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    ckpt = {
        "state_dict": state,
        "epoch": 0,
        "global_step": 10,
        "hyper_parameters": {"encoder": {"model_name": "alignkit-tiny-vit", "pretrained": None}, "lr": 1e-6},
    }
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return student.eval(), teacher.eval(), run


def _embed(model, preprocess=None):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = open_clip.get_tokenizer("alignkit-tiny-vit")(["a cat", "a dog on grass", "x"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(trained, tmp_path, caplog, suffix):
    student, teacher, run = trained
    out = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / f"tiny{suffix}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model, _, _ = open_clip.create_model_and_transforms("alignkit-tiny-vit", pretrained=str(out))
    # open_clip loads full checkpoints with strict=True (a key mismatch raises); also no warnings logged
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    reloaded_keys = set(model.state_dict())
    assert reloaded_keys == set(student.state_dict())
    loaded = open_clip.factory.load_state_dict(str(out))  # open_clip's own file reader
    incompatible = model.load_state_dict(loaded, strict=True)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    model.eval()
    img_s, txt_s = _embed(student)
    img_r, txt_r = _embed(model)
    torch.testing.assert_close(img_r, img_s, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(txt_r, txt_s, atol=1e-6, rtol=1e-5)
    # and it is the student, not the teacher
    assert not torch.allclose(img_r, _embed(teacher)[0], atol=1e-3)
    assert json.loads(out.with_suffix(".json").read_text())["architecture"] == "alignkit-tiny-vit"


def test_run_directory_and_cli(trained, tmp_path):
    _, _, run = trained
    main([str(run), str(tmp_path / "cli.safetensors"), "--no-sidecar"])
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "cli.safetensors")))
    assert keys and not any(k.startswith(("model.", "teacher.", "loss_fn.")) for k in keys)
    assert "logit_scale" in keys
    assert not (tmp_path / "cli.json").exists()


def test_missing_architecture_is_tolerated(tmp_path):
    ckpt = {"state_dict": {"model.w": torch.ones(2), "teacher.w": torch.zeros(2)}}
    torch.save(ckpt, tmp_path / "a.ckpt")
    out = export_checkpoint(tmp_path / "a.ckpt", tmp_path / "a.safetensors")
    assert json.loads(out.with_suffix(".json").read_text())["architecture"] is None


def test_compiled_prefix_and_errors(tmp_path):
    sd = extract_state_dict({"state_dict": {"model._orig_mod.visual.w": torch.ones(1)}})
    assert list(sd) == ["visual.w"]
    with pytest.raises(KeyError, match=r"no tensors under prefix 'model\.'"):
        extract_state_dict({"state_dict": {"student.w": torch.ones(1)}})
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt does not exist"):
        export_checkpoint(tmp_path, tmp_path / "x.safetensors")


def test_omegaconf_hyper_parameters(tmp_path):
    # Lightning saves Hydra configs as OmegaConf objects, which torch's weights_only loader refuses.
    from omegaconf import OmegaConf

    hp = OmegaConf.create({"encoder": {"arch": "alignkit-tiny-vit"}})
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "hyper_parameters": hp}, tmp_path / "b.ckpt")
    out = export_checkpoint(tmp_path / "b.ckpt", tmp_path / "b.pt")
    assert json.loads(out.with_suffix(".json").read_text())["architecture"] == "alignkit-tiny-vit"
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.ones(2))
