"""Alignment/uniformity, CM³ calibrated uniformity and LightCLIP's softened InfoNCE against plain-loop references
and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.losses import (
    Alignment,
    CalibratedUniformity,
    InfoNCE,
    SoftenedInfoNCE,
    Uniformity,
    WeightedLoss,
)
from alignkit.losses.calibrated_uniformity import calibration_weights
from alignkit.losses.softened_infonce import softened_targets
from alignkit.metrics.geometry import alignment as alignment_metric
from alignkit.metrics.geometry import uniformity as uniformity_metric

B, D = 6, 5


def feats(seed=0, b=B, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def unit(x):
    return F.normalize(x, dim=-1)


def ref_log_mean_kernel(z, t, weights=None):
    """log( 1/(N(N−1)) Σ_{i≠j} w_ij exp(−t‖z_i − z_j‖²) ) by loops over python floats."""
    rows = z.tolist()
    n, total = len(rows), 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                d2 = sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))
                w = 1.0 if weights is None else weights[i][j]
                total += w * math.exp(-t * d2)
    return math.log(total / (n * (n - 1)))


# ----- alignment & uniformity -----


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
def test_alignment_matches_loop_reference(alpha):
    img, txt = feats(1)
    got = Alignment(alpha=alpha)({"image_features": img, "text_features": txt})["loss"].item()
    ni, nt = unit(img).tolist(), unit(txt).tolist()
    want = sum(math.dist(a, b) ** alpha for a, b in zip(ni, nt)) / B
    assert got == pytest.approx(want, rel=1e-5)
    if alpha == 2.0:  # and the metric the evaluation reports (α = 2 on normalised features)
        assert got == pytest.approx(alignment_metric(img, txt), rel=1e-5)
    raw = Alignment(alpha=alpha, normalize=False)({"image_features": img, "text_features": txt})["loss"]
    assert raw.item() == pytest.approx(
        sum(math.dist(a, b) ** alpha for a, b in zip(img.tolist(), txt.tolist())) / B, rel=1e-5
    )


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_loop_reference_and_the_metric(t):
    img, txt = feats(2)
    out = Uniformity(t=t)({"image_features": img, "text_features": txt})
    want_i, want_t = ref_log_mean_kernel(unit(img), t), ref_log_mean_kernel(unit(txt), t)
    assert out["image"].item() == pytest.approx(want_i, rel=1e-5)
    assert out["text"].item() == pytest.approx(want_t, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * (want_i + want_t), rel=1e-5)
    assert out["image"].item() == pytest.approx(uniformity_metric(img, t=t), rel=1e-5)
    summed = Uniformity(t=t, modality_reduction="sum")({"image_features": img, "text_features": txt})
    assert summed["loss"].item() == pytest.approx(want_i + want_t, rel=1e-5)
    union = Uniformity(t=t, uniform_over="union")({"image_features": img, "text_features": txt})
    assert union["loss"].item() == pytest.approx(
        ref_log_mean_kernel(unit(torch.cat([img, txt])), t), rel=1e-5
    )


def test_uniformity_of_a_perfectly_spread_set_is_the_closed_form():
    """N = 2d points ±e_k (cross-polytope): each point has one antipode (‖·‖² = 4) and 2d − 2 orthogonal
    neighbours (‖·‖² = 2), so L = log[((2d − 2)·e^{−2t} + e^{−4t}) / (2d − 1)]; and a regular simplex of d + 1
    points (pairwise ‖·‖² = 2(d + 1)/d) gives exactly −t·2(d + 1)/d."""
    t, d = 2.0, 4
    eye = torch.eye(d)
    cross = torch.cat([eye, -eye])
    out = Uniformity(t=t)({"image_features": cross, "text_features": cross})
    want = math.log(((2 * d - 2) * math.exp(-2 * t) + math.exp(-4 * t)) / (2 * d - 1))
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    simplex = torch.eye(d + 1) - 1.0 / (
        d + 1
    )  # d + 1 centred basis vectors: a regular simplex in a d-dim plane
    out = Uniformity(t=t)({"image_features": simplex, "text_features": simplex})
    assert out["loss"].item() == pytest.approx(-t * 2 * (d + 1) / d, rel=1e-6)
    # a collapsed set is the worst case, log 1 = 0
    same = torch.ones(5, d)
    assert Uniformity(t=t)({"image_features": same, "text_features": same})["loss"].item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_uniformity_gradient_pushes_points_apart():
    img, txt = feats(3)
    z = unit(img).clone().requires_grad_(True)
    node = Uniformity(normalize=False)
    loss = node({"image_features": z, "text_features": txt})["loss"]
    loss.backward()
    with torch.no_grad():
        stepped = node({"image_features": z - 0.01 * z.grad, "text_features": txt})["loss"]
    assert stepped.item() < loss.item()
    assert torch.isfinite(z.grad).all()


def test_align_uniform_in_weighted_loss_with_a_schedule():
    img, txt = feats(4)
    wl = WeightedLoss(
        weights={"align": 1.0, "uniform": 0.5},
        schedules={"uniform": {"kind": "linear_warmup", "steps": 10}},
        align=Alignment(),
        uniform=Uniformity(),
    )
    out = {"image_features": img, "text_features": txt, "step": 4}
    res = wl(out)
    want = Alignment()(out)["loss"] + 0.5 * 0.4 * Uniformity()(out)["loss"]
    assert res["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert {"loss_align", "loss_uniform", "uniform_image", "uniform_text", "weight_uniform"} <= set(res)


# ----- CM³ calibrated uniformity -----


def cm3_out(seed=5):
    img, txt = feats(seed)
    xi, xt = feats(seed + 50, d=7)
    return {"image_features": img, "text_features": txt, "image_inputs": xi, "text_inputs": xt}


def cos_matrix(x):
    u = unit(x).tolist()
    return [[sum(a * b for a, b in zip(p, q)) for q in u] for p in u]


@pytest.mark.parametrize(("combine", "similarity_map"), [("fused", "clamp"), ("per_modality", "affine")])
def test_calibrated_uniformity_matches_loop_reference(combine, similarity_map):
    out = cm3_out()
    t = 2.0
    got = CalibratedUniformity(t=t, combine=combine, similarity_map=similarity_map)(out)
    ci, ct = cos_matrix(out["image_inputs"]), cos_matrix(out["text_inputs"])

    def s_map(c):
        return min(max(c, 0.0), 1.0) if similarity_map == "clamp" else (1 + c) / 2

    terms = []
    for key, own in (("image_features", ci), ("text_features", ct)):
        # CM³ as written: exp(−t (‖z_i − z_j‖² − 2 + 2 s_ij)), s from the fused or the own-modality cosine
        z = unit(out[key]).tolist()
        n, total = len(z), 0.0
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                c = 0.5 * (ci[i][j] + ct[i][j]) if combine == "fused" else own[i][j]
                d2 = math.dist(z[i], z[j]) ** 2
                total += math.exp(-t * (d2 - 2 + 2 * s_map(c)))
        terms.append(math.log(total / (n * (n - 1))))
    assert got["image"].item() == pytest.approx(terms[0], rel=1e-5)
    assert got["text"].item() == pytest.approx(terms[1], rel=1e-5)
    assert got["loss"].item() == pytest.approx(0.5 * sum(terms), rel=1e-5)


def test_calibration_weights_and_their_limits():
    """w_ij = exp(2t(1 − s_ij)): identical attributes → weight 1 (plain uniformity), orthogonal (or opposite, with
    clamping) → e^{2t}, so L_cu = L_uniform + 2t when every pair is unrelated; β = 0 switches calibration off."""
    t = 1.5
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    logw = calibration_weights(a, a, t)
    assert logw[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert logw[0, 1].item() == pytest.approx(2 * t)
    assert logw[0, 2].item() == pytest.approx(2 * t)  # cos = −1 clamps to s = 0
    assert logw[0, 3].item() == pytest.approx(2 * t * (1 - 1 / math.sqrt(2)), rel=1e-6)
    assert calibration_weights(a, a, t, "affine")[0, 2].item() == pytest.approx(2 * t)  # (1 + (−1))/2 = 0
    assert calibration_weights(a, a, t, "affine")[0, 1].item() == pytest.approx(t)  # s = ½
    img, txt = feats(6)
    plain = Uniformity(t=t)({"image_features": img, "text_features": txt})["loss"].item()
    same_attr = torch.ones(B, 3)
    ones = CalibratedUniformity(t=t)(
        {"image_features": img, "text_features": txt, "image_inputs": same_attr, "text_inputs": same_attr}
    )
    assert ones["loss"].item() == pytest.approx(plain, rel=1e-5)
    ortho = torch.eye(B)
    zeros = CalibratedUniformity(t=t)(
        {"image_features": img, "text_features": txt, "image_inputs": ortho, "text_inputs": ortho}
    )
    assert zeros["loss"].item() == pytest.approx(plain + 2 * t, rel=1e-5)
    off = CalibratedUniformity(t=t, strength=0.0)(cm3_out())
    o = cm3_out()
    assert off["loss"].item() == pytest.approx(Uniformity(t=t)(o)["loss"].item(), rel=1e-5)


def test_calibrated_uniformity_repels_dissimilar_pairs_harder():
    """Two pairs at the same embedding distance: the one with unrelated attributes gets the larger push."""
    z = unit(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0], [0.0, 0.2, 1.0], [0.0, -0.2, 1.0]]))
    z = z.clone().requires_grad_(True)
    # samples 0/1 have identical attributes, 2/3 unrelated ones; 0–1 and 2–3 are equally close in embedding space
    attrs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = {"image_features": z, "text_features": z, "image_inputs": attrs, "text_inputs": attrs}
    CalibratedUniformity(normalize=False)(out)["loss"].backward()
    g = z.grad
    push_01 = ((g[1] - g[0]) @ (z[0] - z[1])).item()  # > 0: gradient descent moves 0 and 1 apart
    push_23 = ((g[3] - g[2]) @ (z[2] - z[3])).item()
    assert 0 < push_01 < push_23


def test_calibrated_uniformity_sources_and_errors():
    out = cm3_out(7)
    with pytest.raises(KeyError, match="teacher_image_features"):
        CalibratedUniformity(source="teacher")(out)
    assert CalibratedUniformity(source="teacher").requires_teacher
    assert not CalibratedUniformity().requires_teacher
    teach = {
        **out,
        "teacher_image_features": out["image_inputs"],
        "teacher_text_features": out["text_inputs"],
    }
    same = CalibratedUniformity(source="teacher")(teach)["loss"]
    assert same.item() == pytest.approx(CalibratedUniformity()(out)["loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="source"):
        CalibratedUniformity(source="typo")


# ----- LightCLIP softened InfoNCE -----


@pytest.mark.parametrize("mass_to", ["negatives", "all", "similar"])
def test_softened_targets_are_distributions_with_the_right_positive_mass(mass_to):
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 2, 4, 6, 1])
    y = softened_targets(logits, labels, 0.3, mass_to)
    torch.testing.assert_close(y.sum(1), torch.ones(5))
    assert (y >= 0).all()
    pos = y[torch.arange(5), labels]
    want = 0.7 + (0.3 / 7 if mass_to == "all" else 0.0)
    torch.testing.assert_close(pos, torch.full((5,), want))
    if mass_to == "negatives":
        neg = y.masked_select(~F.one_hot(labels, 7).bool())
        torch.testing.assert_close(neg, torch.full_like(neg, 0.3 / 6))
    if mass_to == "similar":  # the most similar negative of each row gets the most mass
        masked = logits.masked_fill(F.one_hot(labels, 7).bool(), float("-inf"))
        assert torch.equal(masked.argmax(1), y.masked_fill(F.one_hot(labels, 7).bool(), -1).argmax(1))


def ref_soft_infonce(img, txt, scale, eps, n_neg_share):
    """Per-row loop: −Σ_j y_ij log p_ij with y = 1 − ε on the positive and ε/(N−1) on each negative."""
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        n = a.shape[0]
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            for j in range(n):
                y = (1 - eps) if i == j else eps * n_neg_share(n)
                total += -y * (logits[j] - lse) / n
    return total / 2


def test_softened_infonce_matches_loop_reference_and_the_linear_ramp():
    img, txt = feats(8)
    node = SoftenedInfoNCE(max_softening=0.2, softening_steps=100, logit_scale="none", temperature=0.5)
    out = {"image_features": img, "text_features": txt, "step": 25}
    res = node(out)
    assert res["softening"].item() == pytest.approx(0.05)
    want = ref_soft_infonce(unit(img), unit(txt), 2.0, 0.05, lambda n: 1 / (n - 1))
    assert res["loss"].item() == pytest.approx(want, rel=1e-5)
    assert node.softening(1000) == pytest.approx(0.2) and node.softening(0) == 0.0
    const = SoftenedInfoNCE(max_softening=0.2, schedule="constant", logit_scale="none")
    assert const({"image_features": img, "text_features": txt})["softening"].item() == pytest.approx(0.2)
    with pytest.raises(KeyError, match="step"):
        node({"image_features": img, "text_features": txt})


@pytest.mark.parametrize("mass_to", ["negatives", "all", "similar"])
def test_softened_infonce_at_zero_softening_is_infonce(mass_to):
    img, txt = feats(9)
    scale = torch.tensor(6.0)
    out = {"image_features": img, "text_features": txt, "logit_scale": scale, "step": 0}
    soft = SoftenedInfoNCE(max_softening=0.3, mass_to=mass_to)(out)["loss"]  # step 0 of the ramp: ε = 0
    plain = InfoNCE()(out)["loss"]
    assert soft.item() == pytest.approx(plain.item(), rel=1e-6)
    zero = SoftenedInfoNCE(max_softening=0.0, schedule="constant", mass_to=mass_to)(out)["loss"]
    assert zero.item() == pytest.approx(plain.item(), rel=1e-6)


def test_label_smoothing_variant_is_infonce_plus_a_uniform_cross_entropy():
    """mass_to=all: CE(y, p) = (1 − ε)·CE(onehot, p) + ε·mean_j(−log p_j), by linearity of the cross-entropy."""
    img, txt = feats(10)
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(4.0)}
    eps = 0.25
    got = SoftenedInfoNCE(max_softening=eps, schedule="constant", mass_to="all")(out)["loss"]
    info = InfoNCE()(out)["loss"]
    ni, nt = unit(img), unit(txt)
    uni = 0.5 * sum(-(F.log_softmax(4.0 * a @ b.T, 1)).mean() for a, b in ((ni, nt), (nt, ni)))
    assert got.item() == pytest.approx(((1 - eps) * info + eps * uni).item(), rel=1e-5)
