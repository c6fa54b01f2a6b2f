"""The open_clip encoder node: shipped tiny configs, local checkpoints, clear errors when weights are missing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from alignkit.encoders.openclip import OpenCLIPEncoder, WeightsUnavailableError


def test_pretrained_tag_offline_fails_fast_with_local_file_instructions():
    with pytest.raises(WeightsUnavailableError) as e:
        OpenCLIPEncoder(model="ViT-B-32", pretrained="openai")
    msg = str(e.value)
    assert "encoder.pretrained=/path/to" in msg and "'openai'" in msg and "ViT-B-32" in msg


def test_unknown_names_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        OpenCLIPEncoder(model="ViT-B-33", pretrained=None)
    with pytest.raises(ValueError, match="known tags"):
        OpenCLIPEncoder(model="ViT-B-32", pretrained="not_a_tag")
    with pytest.raises(FileNotFoundError, match="no such file"):
        OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=str(tmp_path / "missing.safetensors"))


def test_local_checkpoint_file_loads_exact_weights(tmp_path, tiny_encoder):
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny_encoder.module.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=str(tmp_path / "w.safetensors"))
    for k, v in enc.module.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_tower_locking_and_grad_checkpointing():
    enc = OpenCLIPEncoder(
        model="alignkit-tiny-vit", pretrained=None, lock_image=True, grad_checkpointing=True
    )
    vis = [p.requires_grad for p in enc.module.visual.parameters()]
    assert not any(vis)
    assert any(p.requires_grad for n, p in enc.module.named_parameters() if not n.startswith("visual."))
    assert enc.module.visual.transformer.grad_checkpointing and enc.module.transformer.grad_checkpointing

    def text_trainable(n_unlocked):
        enc = OpenCLIPEncoder(
            model="alignkit-tiny-vit", pretrained=None, lock_text=True, lock_text_unlocked_layers=n_unlocked
        )
        return {
            n for n, p in enc.module.named_parameters() if p.requires_grad and not n.startswith("visual.")
        }

    t0, t1, t2 = text_trainable(0), text_trainable(1), text_trainable(2)
    assert t0 <= {"logit_scale"}  # the text tower is fully frozen
    # open_clip groups: 1 = the projection, 2 = + the last block and final norm
    assert t0 < t1 < t2 and any("resblocks.1" in n for n in t2) and not any("resblocks.0" in n for n in t2)
