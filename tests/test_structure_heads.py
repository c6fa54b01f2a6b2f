"""Heads: shapes, and the MLP's non-linear part really trains."""

from __future__ import annotations

import pytest
import torch

from alignkit.encoders.heads import LinearHead, MLPHead
from alignkit.losses.structure import StructureLoss


def test_linear_head_shapes():
    h = LinearHead(10, 8)
    assert h(torch.randn(3, 10)).shape == (3, 8)
    assert LinearHead(10, 8, bias=False).proj.bias is None


@pytest.mark.parametrize("residual", [False, True])
def test_mlp_nonlinear_branch_trains(residual):
    torch.manual_seed(0)
    hi, ht = MLPHead(12, 8, hidden=16, residual=residual), MLPHead(10, 8, hidden=16, residual=residual)
    first = hi.mlp[0].weight.detach().clone()
    loss_fn = StructureLoss(warmup_steps=0)
    opt = torch.optim.AdamW([*hi.parameters(), *ht.parameters()], lr=1e-2)
    xi, xt = torch.randn(32, 12), torch.randn(32, 10)
    losses = []
    for _ in range(5):
        out = {"image_features": hi(xi), "text_features": ht(xt), "image_inputs": xi, "text_inputs": xt}
        loss = loss_fn(out)["loss"]
        opt.zero_grad()
        loss.backward()
        assert hi.mlp[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert not torch.allclose(hi.mlp[0].weight, first)
    assert losses[-1] < losses[0]
    # Not a linear (affine) function: f(x+y) - f(x) - f(y) + f(0) is far from zero.
    hi.eval()
    x, y = torch.randn(4, 12), torch.randn(4, 12)
    with torch.no_grad():
        gap = hi(x + y) - hi(x) - hi(y) + hi(torch.zeros_like(x))
    assert gap.abs().max() > 1e-2


def test_mlp_bad_args():
    with pytest.raises(ValueError, match="num_layers"):
        MLPHead(4, 4, num_layers=1)
    with pytest.raises(ValueError, match="activation"):
        MLPHead(4, 4, activation="tanh")
