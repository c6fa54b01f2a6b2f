"""module.compile: the towers compiled in place (backend aot_eager on CPU) train like eager and save open_clip keys."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.losses.contrastive import InfoNCE
from alignkit.modules.clip_refine import AlignModule
from alignkit.modules.compile import compile_options
from alignkit.run.export import export_module


def _module(compile_spec=None) -> AlignModule:
    torch.manual_seed(0)
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)
    return AlignModule(enc, InfoNCE(), optimizer=torch.optim.AdamW, compile=compile_spec)


def _loss_and_grads(m: AlignModule, images, tokens):
    m.zero_grad(set_to_none=True)
    loss = m.loss(m(images, tokens))["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


def test_options_from_the_config_node():
    assert (
        compile_options(None) is None and compile_options({"enabled": False, "backend": "inductor"}) is None
    )
    assert compile_options({"enabled": True, "backend": "aot_eager", "mode": None}) == {
        "backend": "aot_eager"
    }
    with pytest.raises(ValueError, match="unknown option"):
        compile_options({"enabled": True, "backen": "x"})


@pytest.mark.slow
def test_compiled_towers_match_eager_and_keep_open_clip_keys(tmp_path):
    torch._dynamo.reset()
    eager = _module()
    compiled = _module({"enabled": True, "backend": "aot_eager"})
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    compiled.configure_model()  # as the Trainer does before fit
    assert compiled.model.visual._compiled_call_impl is not None
    assert eager.model.visual._compiled_call_impl is None

    torch.manual_seed(1)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16))
    loss_e, grads_e = _loss_and_grads(eager, images, tokens)
    loss_c, grads_c = _loss_and_grads(compiled, images, tokens)
    # aot_eager runs the same fp32 aten kernels after decomposition; only the order of a few reductions may
    # change, i.e. differences of a few fp32 ulps (~1e-7 relative), far below 1e-5
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)

    # checkpoint and export: open_clip's keys, no _orig_mod.
    ckpt = {"state_dict": compiled.state_dict()}
    compiled.on_save_checkpoint(ckpt)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert ckpt["state_dict"].keys() == eager.state_dict().keys()
    out = export_module(compiled, tmp_path / "model.safetensors", sidecar=False)
    sd = load_file(str(out))
    assert not [k for k in sd if "_orig_mod" in k]
    plain = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None).module
    plain.load_state_dict(sd)  # strict: every open_clip key, nothing else
    torch.testing.assert_close(plain.visual.conv1.weight, compiled.model.visual.conv1.weight)
