"""Layer taps on small random towers: each tap equals an independent hook, the last equals the encoder output."""

from __future__ import annotations

import pytest
import timm
import torch

from alignkit.encoders.towers import HFTextTower, TimmVisionTower


def _hook_outputs(modules):
    seen: dict[int, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o)) for i, m in enumerate(modules)
    ]
    return seen, handles


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_timm_vit_taps(pool):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
        global_pool="token" if pool == "cls" else "avg",
    )  # fmt: skip
    tower = TimmVisionTower(vit, pool=pool)
    assert tower.layer_names == ["blocks.0", "blocks.1", "blocks.2", "head"]
    x = torch.randn(2, 3, 32, 32)
    seen, handles = _hook_outputs(list(vit.blocks))
    with torch.no_grad():
        feats = tower.forward_layers(x)
        own = vit.forward_head(vit.forward_features(x), pre_logits=True)
    for h in handles:
        h.remove()
    for i in range(3):
        want = seen[i][:, 0] if pool == "cls" else seen[i][:, vit.num_prefix_tokens :].mean(1)
        torch.testing.assert_close(feats[i], want)  # before the final norm
    torch.testing.assert_close(feats[3], own)
    with torch.no_grad():
        only = tower.forward_layers(x, [1])
    torch.testing.assert_close(only[1], feats[1])


def test_timm_cnn_taps_and_frozen():
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    tower = TimmVisionTower(net)
    assert tower.num_layers == len(net.blocks) + 1 and tower.layer_names[-1] == "head"
    tower.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 64, 64)
    seen, handles = _hook_outputs(list(net.blocks))
    with torch.no_grad():
        feats = tower.forward_layers(x, [0, 3, -1])
        own = net.forward_head(net.forward_features(x), pre_logits=True)
    for h in handles:
        h.remove()
    torch.testing.assert_close(feats[0], seen[0].mean((2, 3)))
    torch.testing.assert_close(feats[3], seen[3].mean((2, 3)))
    torch.testing.assert_close(feats[tower.num_layers - 1], own)
    assert feats[tower.num_layers - 1].shape == (2, 1280)
    with pytest.raises(IndexError, match=r"valid layers: 0=blocks.0, .*7=head"):
        tower.forward_layers(x, [8])


def test_load_errors_are_actionable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"(?s)vit_small_patch14_dinov2.*checkpoint_path="):
        TimmVisionTower("vit_small_patch14_dinov2.lvd142m", pretrained=True)
    with pytest.raises(RuntimeError, match=r"(?s)alignkit-test/no-such-model.*local directory"):
        HFTextTower("alignkit-test/no-such-model")
