"""optimizer.impl: the AdamW kernel choice (alignkit.modules.optim)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignkit.modules.optim import adamw, resolve_impl


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def test_auto_is_foreach_on_cpu_and_fused_on_cuda():
    assert resolve_impl("auto", _params()) == "foreach"
    cuda_like = [torch.empty(2, device="meta")]  # not CUDA: still foreach
    assert resolve_impl("auto", cuda_like) == "foreach"
    assert resolve_impl("plain", _params()) == "plain"


@pytest.mark.parametrize("impl", ["foreach", "plain"])
def test_impl_sets_the_kernel_flags_and_matches_the_reference_update(impl):
    ps = _params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = adamw([{"params": ps}], impl=impl, lr=0.1, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.1, foreach=False)
    assert opt.defaults["foreach"] is (impl == "foreach")
    assert not opt.defaults["fused"]
    for _ in range(3):
        for a, b in zip(ps, ref, strict=True):
            g = torch.full_like(a, 0.5)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ps, ref, strict=True):
        # same maths, different kernels: summation order may differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_impl_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="auto, fused, foreach, plain"):
        adamw(_params(), impl="fast", lr=0.1)


def test_shipped_config_builds_foreach_adamw_on_cpu():
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/optimizer/adamw.yaml")
    opt = instantiate(cfg)([{"params": _params()}])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and opt.defaults["lr"] == cfg.lr
