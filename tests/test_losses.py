"""Loss nodes against independent references worked with plain loops / closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import (
    FeatureDistillation,
    HybridDistillation,
    InfoNCE,
    LogitDistillation,
    RandomFeatureAlignment,
    WeightedLoss,
)

torch.manual_seed(0)
B, D = 6, 5


def feats(seed=0, b=B, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def ref_infonce(img, txt, scale):
    """Per-row loop: -log softmax of the positive, averaged over rows and both directions."""
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(a.shape[0]):
            logits = [scale * float(a[i] @ b[j]) for j in range(b.shape[0])]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            total += (lse - logits[i]) / a.shape[0]
    return total / 2


@pytest.mark.parametrize("normalize", [True, False])
def test_infonce_matches_loop_reference(normalize):
    img, txt = feats()
    scale = torch.tensor(7.0)
    out = InfoNCE(normalize=normalize, logit_scale="model")(
        {"image_features": img, "text_features": txt, "logit_scale": scale}
    )
    ni, nt = (F.normalize(img, dim=1), F.normalize(txt, dim=1)) if normalize else (img, txt)
    assert out["loss"].item() == pytest.approx(ref_infonce(ni, nt, 7.0), rel=1e-5)


def test_infonce_fixed_temperature_and_learnable_scale():
    img, txt = feats(1)
    ni, nt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    fixed = InfoNCE(normalize=True, logit_scale="none", temperature=0.05)(
        {"image_features": img, "text_features": txt}
    )
    assert fixed["loss"].item() == pytest.approx(ref_infonce(ni, nt, 20.0), rel=1e-5)
    learn = InfoNCE(normalize=False, logit_scale="learnable", init_logit_scale=3.0)
    out = learn({"image_features": img, "text_features": txt})
    assert out["loss"].item() == pytest.approx(ref_infonce(img, txt, 3.0), rel=1e-5)
    out["loss"].backward()
    assert learn.scaler.log_scale.grad is not None and learn.scaler.log_scale.grad.abs() > 0
    with pytest.raises(KeyError, match="logit_scale"):
        InfoNCE(logit_scale="model")({"image_features": img, "text_features": txt})


def _one_sgd_step_on_scale(img, txt, **kw):
    """One SGD step on a learnable scale; returns (scale before, scale after) as the loss applies them."""
    loss_fn = InfoNCE(normalize=True, logit_scale="learnable", **kw)
    before = float(loss_fn.scaler({}).detach())
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    loss_fn({"image_features": img, "text_features": txt})["loss"].backward()
    opt.step()
    return before, float(loss_fn.scaler({}).detach())


def _close_pairs(seed=0, b=8, d=16):
    """Unit features that share a large common part, so cosines differ by a few 1e-2 and scale 100 does not
    saturate the softmax."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return common + 0.1 * torch.randn(b, d, generator=g)


def test_learnable_scale_trains_from_100_in_both_directions():
    img = _close_pairs()
    # Matched pairs: the positive is each row's best logit, so a sharper softmax lowers the loss -> scale grows.
    before, after = _one_sgd_step_on_scale(img, img.clone(), init_logit_scale=100.0)
    assert before == pytest.approx(100.0, rel=1e-6)
    assert after > before * (1 + 1e-4)
    # Shuffled pairs: each positive sits below the softmax mean of its row -> a softer softmax helps, scale shrinks.
    before, after = _one_sgd_step_on_scale(img, img.roll(1, dims=0), init_logit_scale=100.0)
    assert after < before * (1 - 1e-4)
    # An explicit cap above the start leaves the scale free to move, and clamps it once reached.
    _, after = _one_sgd_step_on_scale(img, img.clone(), init_logit_scale=100.0, max_logit_scale=150.0)
    assert 100.0 < after <= 150.0
    capped = InfoNCE(logit_scale="learnable", init_logit_scale=100.0, max_logit_scale=150.0)
    with torch.no_grad():
        capped.scaler.log_scale.fill_(math.log(400.0))
    assert float(capped.scaler({}).detach()) == pytest.approx(150.0)
    # A cap at the start would freeze the scale (exp(log 100) > 100 in fp32): refused with the fix in the message.
    with pytest.raises(ValueError, match="max_logit_scale=null"):
        InfoNCE(logit_scale="learnable", init_logit_scale=100.0, max_logit_scale=100.0)


def softmax_rows(m, t):
    return [[math.exp(x / t) / sum(math.exp(y / t) for y in row) for x in row] for row in m]


def ref_hycd(img, txt, timg, ttxt, alpha, t):
    """KL(alpha*I + (1-alpha)*softmax(S_t/T) || softmax(S/T)) per row, both directions, x T^2, by loops."""
    res = 0.0
    for a, b, ta, tb in ((img, txt, timg, ttxt), (txt, img, ttxt, timg)):
        s = (a @ b.T).tolist()
        st = (ta @ tb.T).tolist()
        p, q = softmax_rows(s, t), softmax_rows(st, t)
        kl = 0.0
        for i in range(len(s)):
            for j in range(len(s)):
                target = alpha * (i == j) + (1 - alpha) * q[i][j]
                if target > 0:
                    kl += target * (math.log(target) - math.log(p[i][j]))
        res += kl / len(s)
    return res / 2 * t * t


def hycd_out(seed=2):
    img, txt = feats(seed)
    timg, ttxt = feats(seed + 100)
    return {
        "image_features": img,
        "text_features": txt,
        "teacher_image_features": timg,
        "teacher_text_features": ttxt,
    }


@pytest.mark.parametrize(("alpha", "t"), [(0.5, 1.0), (0.0, 2.0), (1.0, 0.5), (0.3, 1.5)])
def test_hycd_matches_loop_reference(alpha, t):
    out = hycd_out()
    got = HybridDistillation(alpha=alpha, temperature=t)(out)["loss"].item()
    want = ref_hycd(
        out["image_features"],
        out["text_features"],
        out["teacher_image_features"],
        out["teacher_text_features"],
        alpha,
        t,
    )
    assert got == pytest.approx(want, rel=1e-5)


def test_hycd_is_alpha_infonce_plus_kd_plus_constant():
    """HyCD(α) = α·InfoNCE + (1-α)·KD + c(teacher): same value up to c, and the same student gradient."""
    alpha, t = 0.4, 1.3
    out = hycd_out(3)
    img = out["image_features"].clone().requires_grad_(True)
    txt = out["text_features"].clone().requires_grad_(True)
    o = {**out, "image_features": img, "text_features": txt}
    hycd = HybridDistillation(alpha=alpha, temperature=t, scale_by_t_squared=False)(o)["loss"]
    info = InfoNCE(normalize=False, logit_scale="none", temperature=t)(o)["loss"]
    kd = HybridDistillation(alpha=0.0, temperature=t, scale_by_t_squared=False)(o)["loss"]
    combo = alpha * info + (1 - alpha) * kd
    # the constant depends on the teacher only: Σ target log target − (1−α) Σ q log q, row-averaged, both directions
    const = 0.0
    for a, b in (
        (out["teacher_image_features"], out["teacher_text_features"]),
        (out["teacher_text_features"], out["teacher_image_features"]),
    ):
        q = torch.softmax(a @ b.T / t, dim=1)
        tgt = alpha * torch.eye(B) + (1 - alpha) * q
        const += (torch.xlogy(tgt, tgt).sum(1) - (1 - alpha) * torch.xlogy(q, q).sum(1)).mean().item() / 2
    assert hycd.item() == pytest.approx(combo.item() + const, rel=1e-5)
    g1 = torch.autograd.grad(hycd, (img, txt), retain_graph=True)
    g2 = torch.autograd.grad(combo, (img, txt))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hycd_reverse_kl_and_teacher_required():
    out = hycd_out(4)
    fwd = HybridDistillation(alpha=0.5, kl_direction="forward")(out)["loss"]
    rev = HybridDistillation(alpha=0.5, kl_direction="reverse")(out)["loss"]
    # reverse: KL(p || target) by hand for the i2t direction + t2i
    tot = 0.0
    for a, b, ta, tb in (
        ("image_features", "text_features", "teacher_image_features", "teacher_text_features"),
        ("text_features", "image_features", "teacher_text_features", "teacher_image_features"),
    ):
        p = torch.softmax(out[a] @ out[b].T, 1)
        tgt = 0.5 * torch.eye(B) + 0.5 * torch.softmax(out[ta] @ out[tb].T, 1)
        tot += (p * (p.log() - tgt.log())).sum(1).mean().item() / 2
    assert rev.item() == pytest.approx(tot, rel=1e-5)
    assert fwd.item() != pytest.approx(rev.item(), rel=1e-3)
    with pytest.raises(KeyError, match="teacher"):
        HybridDistillation()({"image_features": out["image_features"], "text_features": out["text_features"]})


def test_feature_and_logit_distillation():
    out = hycd_out(5)
    fd = FeatureDistillation()(out)["loss"].item()
    # Released fd: mse(img, img_t) + mse(txt, txt_t), each the mean over all B*d elements, summed over modalities.
    (b, d), total = out["image_features"].shape, 0.0
    for s, t in (("image_features", "teacher_image_features"), ("text_features", "teacher_text_features")):
        total += sum((float(out[s][i, j]) - float(out[t][i, j])) ** 2 for i in range(b) for j in range(d)) / (
            b * d
        )
    assert fd == pytest.approx(total, rel=1e-6)
    fd_mean = FeatureDistillation(modality_reduction="mean")(out)["loss"].item()
    assert fd_mean == pytest.approx(total / 2, rel=1e-6)
    with pytest.raises(ValueError, match="modality_reduction"):
        FeatureDistillation(modality_reduction="avg")
    ld = LogitDistillation()(out)["loss"].item()
    s = out["image_features"] @ out["text_features"].T
    st = out["teacher_image_features"] @ out["teacher_text_features"].T
    assert ld == pytest.approx(((s - st) ** 2).mean().item(), rel=1e-6)


# ----- RaFA -----


def test_rafa_code_and_paper_reductions():
    img, txt = feats(6)
    rafa = RandomFeatureAlignment(reduction="mean", seed=3)
    out = rafa({"image_features": img, "text_features": txt, "step": 7})
    r = rafa.sample(B, D, 7, img.device)
    code = ((img - r) ** 2).mean() + ((txt - r) ** 2).mean()
    assert out["loss"].item() == pytest.approx(code.item(), rel=1e-6)
    paper = RandomFeatureAlignment(reduction="paper", seed=3)(
        {"image_features": img, "text_features": txt, "step": 7}
    )
    by_hand = sum(((img[i] - r[i]) ** 2).sum() + ((txt[i] - r[i]) ** 2).sum() for i in range(B)) / (2 * B)
    assert paper["loss"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert paper["loss"].item() == pytest.approx(out["loss"].item() * D / 2, rel=1e-6)


def test_rafa_expectation_is_norm_penalty_plus_d_sigma2():
    """E_r[(1/2B) Σ ‖z−r‖² + ‖t−r‖²] = (1/2B) Σ (‖z‖² + ‖t‖²) + d·σ² for r ~ N(0, σ²I)."""
    img, txt = feats(7, b=4, d=8)
    sigma = 1.7
    rafa = RandomFeatureAlignment(std=sigma, reduction="paper", seed=1)
    vals = torch.tensor(
        [rafa({"image_features": img, "text_features": txt, "step": s})["loss"].item() for s in range(4000)]
    )
    expected = ((img**2).sum() + (txt**2).sum()).item() / (2 * 4) + 8 * sigma**2
    stderr = vals.std().item() / math.sqrt(len(vals))
    assert abs(vals.mean().item() - expected) < 4 * stderr


def test_rafa_beta_zero_is_pure_norm_penalty_and_shared_targets():
    img, txt = feats(8)
    out = RandomFeatureAlignment(beta=0.0)({"image_features": img, "text_features": txt})
    assert out["loss"].item() == pytest.approx(((img**2).mean() + (txt**2).mean()).item(), rel=1e-6)
    # shared: identical features for both modalities give identical terms; separate draws do not
    same = {"image_features": img, "text_features": img.clone(), "step": 1}
    sh = RandomFeatureAlignment(shared=True)(same)
    assert sh["image"].item() == pytest.approx(sh["text"].item(), rel=1e-7)
    sep = RandomFeatureAlignment(shared=False)(same)
    assert sep["image"].item() != pytest.approx(sep["text"].item(), rel=1e-4)


def test_rafa_priors_have_the_requested_statistics(tmp_path):
    import numpy as np

    u = RandomFeatureAlignment(prior="uniform", low=-2.0, high=4.0).sample(20000, 4, 0, torch.device("cpu"))
    assert u.min() >= -2.0 and u.max() <= 4.0 and abs(u.mean().item() - 1.0) < 0.05
    ub = RandomFeatureAlignment(prior="uniform", low=-2.0, high=4.0, beta=0.5).sample(
        20000, 4, 0, torch.device("cpu")
    )
    assert ub.min() >= -0.5 - 1e-6 and ub.max() <= 2.5 + 1e-6
    mean, std = np.array([1.0, -2.0, 0.0]), np.array([0.5, 2.0, 1.0])
    np.savez(tmp_path / "stats.npz", mean=mean, std=std)
    s = RandomFeatureAlignment(prior="data_stats", stats_path=str(tmp_path / "stats.npz")).sample(
        40000, 3, 0, torch.device("cpu")
    )
    torch.testing.assert_close(s.mean(0), torch.tensor(mean, dtype=torch.float32), atol=0.05, rtol=0)
    torch.testing.assert_close(s.std(0), torch.tensor(std, dtype=torch.float32), atol=0.05, rtol=0)
    v = RandomFeatureAlignment(std=1.0, beta=4.0, beta_scales="variance").sample(
        40000, 2, 0, torch.device("cpu")
    )
    assert abs(v.std().item() - 2.0) < 0.05
    with pytest.raises(ValueError, match="stats_path"):
        RandomFeatureAlignment(prior="data_stats")
    with pytest.raises(FileNotFoundError, match="stats file"):
        RandomFeatureAlignment(prior="data_stats", stats_path=str(tmp_path / "nope.npz"))


def test_rafa_rank_slices_reassemble_the_single_process_draw(monkeypatch):
    """Rank r uses rows [r·B, (r+1)·B) of the global draw, so 2 ranks see exactly what 1 process would."""
    import alignkit.losses.rafa as rafa_mod

    img, _ = feats(9, b=8)
    rafa = RandomFeatureAlignment(seed=5)
    full = rafa._references(img, step=3, stream=0)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(rafa_mod, "world_size", lambda: 2)
        monkeypatch.setattr(rafa_mod, "rank", lambda r=r: r)
        parts.append(rafa._references(img[:4], step=3, stream=0))
    torch.testing.assert_close(torch.cat(parts), full)


# ----- weighted sum -----


def test_weighted_loss_weights_schedules_and_skipping():
    img, txt = feats(10)
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(5.0), "step": 25}
    a, b = InfoNCE(), RandomFeatureAlignment(beta=0.0)
    wl = WeightedLoss(
        weights={"c": 2.0, "r": 3.0}, schedules={"r": {"kind": "linear_warmup", "steps": 100}}, c=a, r=b
    )
    res = wl(out)
    want = 2.0 * a(out)["loss"] + 3.0 * 0.25 * b(out)["loss"]
    assert res["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert res["weight_r"].item() == pytest.approx(0.75)
    decay = WeightedLoss(schedules={"r": {"kind": "linear_decay", "steps": 100}}, r=b)
    assert decay.weight("r", 25) == pytest.approx(0.75) and decay.weight("r", 500) == 0.0
    zero = WeightedLoss(weights={"c": 0.0}, c=a, r=b)(out)
    assert "loss_c" not in zero and zero["loss"].item() == pytest.approx(b(out)["loss"].item())
    assert not WeightedLoss(weights={"h": 0.0}, h=HybridDistillation(), r=b).requires_teacher
    assert WeightedLoss(h=HybridDistillation()).requires_teacher
    with pytest.raises(KeyError, match="not in terms"):
        WeightedLoss(weights={"typo": 1.0}, c=a)
