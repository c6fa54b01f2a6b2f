"""Cache-and-recompute accumulation: gradients equal one big batch; dropout masks replayed in the second pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_train

from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.losses import HybridDistillation, InfoNCE, RandomFeatureAlignment, WeightedLoss
from alignkit.modules.accumulation import cache_recompute_backward
from alignkit.run.train import train


def _loss():
    return WeightedLoss(
        weights={"rafa": 1.0, "hycd": 1.0, "nce": 1.0, "nce2": 0.5},
        rafa=RandomFeatureAlignment(seed=1),
        hycd=HybridDistillation(alpha=0.5),
        nce=InfoNCE(normalize=True, logit_scale="model"),
        nce2=InfoNCE(normalize=True, logit_scale="learnable", init_logit_scale=10.0),
    )


def _grads(*mods):
    return torch.cat([p.grad.reshape(-1) for m in mods for p in m.parameters() if p.grad is not None])


def test_gradients_equal_one_big_batch_on_the_tiny_clip(tiny_encoder):
    student = tiny_encoder.module
    with torch.no_grad():
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss = _loss()
    g = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(10, 3, 32, 32, generator=g), torch.randint(1, 400, (10, 16), generator=g)

    def fwd(i, t):
        return OpenCLIPEncoder.encode(student, i, t)

    def tea(i, t):
        with torch.no_grad():
            return {f"teacher_{k}": v for k, v in OpenCLIPEncoder.encode(teacher, i, t).items()}

    out = {**fwd(images, tokens), **tea(images, tokens), "step": 4}
    ref_loss = loss(out)["loss"]
    ref_loss.backward()
    ref = _grads(student, loss)
    student.zero_grad(), loss.zero_grad()
    terms, _ = cache_recompute_backward(
        fwd, loss, images, tokens, 3, extra={"step": 4}, teacher=tea
    )  # 3+3+3+1
    torch.testing.assert_close(terms["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(student, loss), ref, rtol=1e-4, atol=1e-5)  # float32 summation order
    assert loss.terms["nce2"].scaler.log_scale.grad is not None  # the loss's own parameter is trained too


def test_dropout_masks_are_replayed_in_the_recompute_pass():
    torch.manual_seed(0)
    lin_i, lin_t = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)
    loss = InfoNCE(normalize=True, logit_scale="none", temperature=0.2)
    x_i, x_t = torch.randn(8, 6), torch.randn(8, 6)

    def fwd(i, t):
        return {"image_features": F.dropout(lin_i(i), 0.5), "text_features": F.dropout(lin_t(t), 0.5)}

    # reference: the loss on exactly the features pass 1 computed (same per-micro-batch RNG states), with autograd
    torch.manual_seed(7)
    feats = [fwd(x_i[s : s + 4], x_t[s : s + 4]) for s in (0, 4)]
    ref_rng_after = torch.get_rng_state()
    loss({k: torch.cat([f[k] for f in feats]) for k in feats[0]})["loss"].backward()
    ref = _grads(lin_i, lin_t)
    lin_i.zero_grad(), lin_t.zero_grad()
    torch.manual_seed(7)
    cache_recompute_backward(fwd, loss, x_i, x_t, 4)
    torch.testing.assert_close(_grads(lin_i, lin_t), ref)
    assert torch.equal(torch.get_rng_state(), ref_rng_after)  # the RNG stream continues as after one pass


def test_cache_recompute_option_trains_like_the_full_batch(tmp_path):
    from safetensors.torch import load_file

    # plain SGD: Adam's normalised update turns float noise in near-zero gradients into lr-sized differences
    base = [
        "+experiment=smoke",
        "trainer.max_steps=2",
        "data.num_samples=64",
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=0.1",
        "~optimizer.betas",
        "~optimizer.eps",
        "~optimizer.impl",
    ]
    train(compose_train(base, tmp_path / "full"))
    train(
        compose_train(
            [*base, "module.accumulation=cache_recompute", "module.micro_batch_size=8"], tmp_path / "gc"
        )
    )
    weights = "open_clip/open_clip_model.safetensors"
    a, b = load_file(tmp_path / "full" / weights), load_file(tmp_path / "gc" / weights)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        train(compose_train([*base, "module.accumulation=cache_recompute"], tmp_path / "bad"))
