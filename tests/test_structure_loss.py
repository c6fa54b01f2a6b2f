"""R_S and StructureLoss against plain loop references written independently here."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.structure import (
    StructureLoss,
    row_divergence,
    structure_regularizer,
)

# ---------------------------------------------------------------- naive references (python floats, loops)


def _ref_prep(z, centering, center_first, eps=1e-12):
    rows = [list(r) for r in z]
    n, d = len(rows), len(rows[0])

    def normalize(rs):
        out = []
        for r in rs:
            nrm = math.sqrt(sum(v * v for v in r))
            out.append([v / max(nrm, eps) for v in r])
        return out

    def center(rs):
        if centering == "none":
            return rs
        mean = [sum(rs[i][k] for i in range(n)) / n for k in range(d)]
        rs = [[rs[i][k] - mean[k] for k in range(d)] for i in range(n)]
        if centering == "standard":
            std = [math.sqrt(sum(rs[i][k] ** 2 for i in range(n)) / n) for k in range(d)]
            rs = [[rs[i][k] / (std[k] + eps) for k in range(d)] for i in range(n)]
        return rs

    return normalize(center(rows)) if center_first else center(normalize(rows))


def _ref_transition(z, similarity, tau, gamma, mask):
    n = len(z)
    p = []
    for i in range(n):
        logits = []
        for j in range(n):
            if mask and i == j:
                logits.append(None)
                continue
            if similarity == "cosine":
                s = sum(u * v for u, v in zip(z[i], z[j]))
            else:
                s = math.exp(-gamma * sum((u - v) ** 2 for u, v in zip(z[i], z[j])))
            logits.append(s / tau)
        mx = max(v for v in logits if v is not None)
        ex = [0.0 if v is None else math.exp(v - mx) for v in logits]
        tot = sum(ex)
        p.append([e / tot for e in ex])
    return p


def _ref_matmul(a, b):
    n = len(a)
    return [[sum(a[i][k] * b[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def _ref_kl(p, q, eps=1e-12):
    return sum(pi * (math.log(pi + eps) - math.log(qi + eps)) for pi, qi in zip(p, q))


def _ref_div(px, pa, divergence):
    n, tot = len(px), 0.0
    for i in range(n):
        m = [(u + v) / 2 for u, v in zip(px[i], pa[i])]
        if divergence == "js":
            tot += 0.5 * (_ref_kl(pa[i], m) + _ref_kl(px[i], m))
        else:
            tot += 0.5 * (_ref_kl(m, pa[i]) + _ref_kl(m, px[i]))
    return tot / n


def ref_rs(
    x,
    a,
    levels=1,
    weighting="none",
    centering="mean",
    center_first=False,
    similarity="cosine",
    tau=0.05,
    rbf_gamma=1.0,
    mask_diagonal=False,
    divergence="kl_from_midpoint",
    margin=0.0,
):
    zx = _ref_prep(x.double().tolist(), centering, center_first)
    za = _ref_prep(a.double().tolist(), centering, center_first)
    px = _ref_transition(zx, similarity, tau, rbf_gamma, mask_diagonal)
    pa = _ref_transition(za, similarity, tau, rbf_gamma, mask_diagonal)
    total, pxl, pal = 0.0, px, pa
    for lv in range(1, levels + 1):
        if lv > 1:
            pxl, pal = _ref_matmul(pxl, px), _ref_matmul(pal, pa)
        w = 1.0 if weighting == "none" else 1.0 / lv
        total += w * max(0.0, _ref_div(pxl, pal, divergence) - margin)
    return total / levels


def ref_infonce(a1, a2, tau):
    a1 = torch.nn.functional.normalize(a1.double(), dim=-1).tolist()
    a2 = torch.nn.functional.normalize(a2.double(), dim=-1).tolist()
    n = len(a1)
    s = [[sum(u * v for u, v in zip(a1[i], a2[j])) / tau for j in range(n)] for i in range(n)]

    def ce_rows(mat):
        return sum(-mat[i][i] + math.log(sum(math.exp(v) for v in mat[i])) for i in range(n)) / n

    st = [[s[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (ce_rows(s) + ce_rows(st))


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g) + 0.3
    a = torch.randn(7, 4, generator=g) - 0.2
    return x, a


def _orth(d, seed):
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q.float()


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("similarity", ["cosine", "rbf"])
@pytest.mark.parametrize("divergence", ["kl_from_midpoint", "js"])
def test_zero_when_aligned_equals_original(batch, similarity, divergence):
    x, _ = batch
    r = structure_regularizer(x, x.clone(), similarity=similarity, divergence=divergence, levels=2)
    assert r.abs().item() < 1e-6


def test_zero_for_orthogonal_map_cosine(batch):
    x, _ = batch
    q = _orth(5, 1)
    assert structure_regularizer(x, x @ q).abs().item() < 1e-5
    # A semi-orthogonal map into a larger space (orthonormal columns) preserves inner products too.
    w = _orth(8, 2)[:5]
    assert structure_regularizer(x, x @ w, levels=3, weighting="inverse").abs().item() < 1e-5


@pytest.mark.parametrize("similarity", ["cosine", "rbf"])
def test_invariances(batch, similarity):
    x, a = batch
    base = structure_regularizer(x, a, similarity=similarity)
    scaled = structure_regularizer(3.7 * x, 0.2 * a, similarity=similarity)
    rot = structure_regularizer(x @ _orth(5, 3), a @ _orth(4, 4), similarity=similarity)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rot, base, rtol=1e-4, atol=1e-6)
    # Translation invariance needs centring before the normalisation.
    kw = dict(similarity=similarity, centering="mean", center_first=True)
    t_base = structure_regularizer(x, a, **kw)
    t_shift = structure_regularizer(x + torch.randn(5), a - 4.0, **kw)
    torch.testing.assert_close(t_shift, t_base, rtol=1e-4, atol=1e-6)


OPTIONS = [
    {},
    {"levels": 3},
    {"levels": 3, "weighting": "inverse"},
    {"centering": "none"},
    {"centering": "standard"},
    {"centering": "standard", "center_first": True},
    {"center_first": True},
    {"similarity": "rbf", "rbf_gamma": 0.7},
    {"similarity": "rbf", "tau": 0.2, "levels": 2},
    {"mask_diagonal": True},
    {"mask_diagonal": True, "levels": 2, "weighting": "inverse"},
    {"divergence": "js"},
    {"divergence": "js", "levels": 2, "tau": 0.5},
    {"margin": 0.05},
    {"margin": 1e3},
    {"tau": 1.0},
]


@pytest.mark.parametrize(
    "opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_options_match_loop_reference(batch, opts):
    x, a = batch
    got = structure_regularizer(x, a, **opts).item()
    want = ref_rs(x, a, **opts)
    assert got == pytest.approx(want, rel=2e-4, abs=1e-6)


def test_js_symmetric_and_bounded(batch):
    x, a = batch
    js = structure_regularizer(x, a, divergence="js", tau=0.01)
    js_swapped = structure_regularizer(a, x, divergence="js", tau=0.01)
    torch.testing.assert_close(js, js_swapped)
    assert 0.0 < js.item() <= math.log(2) + 1e-6
    # Disjoint distributions reach the bound.
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert row_divergence(p, p.flip(1), "js").item() == pytest.approx(math.log(2), rel=1e-6)


def test_kl_from_midpoint_differs_from_js_worked_example():
    p = torch.tensor([[0.9, 0.1]])
    q = torch.tensor([[0.5, 0.5]])
    m = [0.7, 0.3]
    js = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + 0.5 * (
        0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    )
    kl_mid = 0.5 * (m[0] * math.log(0.7 / 0.9) + m[1] * math.log(0.3 / 0.1)) + 0.5 * (
        m[0] * math.log(0.7 / 0.5) + m[1] * math.log(0.3 / 0.5)
    )
    assert row_divergence(p, q, "js").item() == pytest.approx(js, rel=1e-5)
    assert row_divergence(p, q, "kl_from_midpoint").item() == pytest.approx(kl_mid, rel=1e-5)
    assert abs(js - kl_mid) > 1e-3  # 0.0823 vs 0.0892


def test_fp32_under_autocast(batch):
    x, a = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = structure_regularizer(x.bfloat16(), a.bfloat16())
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, structure_regularizer(x.bfloat16().float(), a.bfloat16().float()))


def test_bad_option_raises(batch):
    x, a = batch
    with pytest.raises(ValueError, match="centering"):
        structure_regularizer(x, a, centering="median")
    with pytest.raises(ValueError, match="divergence"):
        structure_regularizer(x, a, divergence="kl")


# ---------------------------------------------------------------- StructureLoss


def _out(step=None, seed=0, b=6):
    g = torch.Generator().manual_seed(seed)
    out = {
        "image_inputs": torch.randn(b, 10, generator=g),
        "text_inputs": torch.randn(b, 12, generator=g),
        "image_features": torch.randn(b, 4, generator=g, requires_grad=True),
        "text_features": torch.randn(b, 4, generator=g, requires_grad=True),
    }
    if step is not None:
        out["step"] = step
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("step", "lam"), [(0, 0.0), (250, 2.5), (1000, 10.0), (5000, 10.0)])
def test_structure_loss_total_warmup_and_reduction(reduction, step, lam):
    loss_fn = StructureLoss(modality_reduction=reduction, divergence="js", levels=2)
    out = _out(step)
    res = loss_fn(out)
    r_img = ref_rs(out["image_inputs"], out["image_features"].detach(), divergence="js", levels=2)
    r_txt = ref_rs(out["text_inputs"], out["text_features"].detach(), divergence="js", levels=2)
    r = (r_img + r_txt) * (0.5 if reduction == "mean" else 1.0)
    c = ref_infonce(out["image_features"].detach(), out["text_features"].detach(), 0.05)
    assert res["loss_contrastive"].item() == pytest.approx(c, rel=1e-5)
    assert res["loss_structure_image"].item() == pytest.approx(r_img, rel=2e-4)
    assert res["loss_structure_text"].item() == pytest.approx(r_txt, rel=2e-4)
    assert res["loss_structure"].item() == pytest.approx(r, rel=2e-4)
    assert res["lambda_structure"].item() == pytest.approx(lam)
    assert res["loss"].item() == pytest.approx(c + lam * r, rel=2e-4)


def test_infonce_matches_reference():
    o = _out()
    got = StructureLoss(temperature=0.07, use_structure=False)(o)["loss_contrastive"].item()
    assert got == pytest.approx(
        ref_infonce(o["image_features"].detach(), o["text_features"].detach(), 0.07), rel=1e-5
    )


def test_step_required_during_warmup_and_gradients():
    with pytest.raises(KeyError, match="step"):
        StructureLoss()(_out())
    res = StructureLoss(warmup_steps=0)(_out())  # no step needed without warm-up
    assert res["lambda_structure"].item() == 10.0
    out = _out(step=torch.tensor(2000))
    out["image_inputs"].requires_grad_(True)
    StructureLoss()(out)["loss"].backward()
    assert out["image_features"].grad is not None and out["image_features"].grad.abs().sum() > 0
    assert (
        out["image_inputs"].grad is not None
    )  # inputs are frozen upstream; the maths is still differentiable


def test_use_structure_false_reports_but_does_not_train():
    out = _out(step=2000)
    res = StructureLoss(use_structure=False)(out)
    assert res["lambda_structure"].item() == 0.0
    assert not res["loss_structure"].requires_grad
    assert res["loss_structure"].item() > 0
    torch.testing.assert_close(res["loss"], res["loss_contrastive"])


def test_one_process_cross_rank_and_gather_structure_change_nothing():
    # Without a process group every cross-rank option and the R_S gather reduce to the local batch.
    out = _out(step=500)
    base = StructureLoss()(out)
    for kw in ({"cross_rank": "local"}, {"cross_rank": "gather_global_loss"}, {"gather_structure": True}):
        res = StructureLoss(**kw)(out)
        torch.testing.assert_close(res["loss"], base["loss"])


def test_bf16_autocast_keeps_infonce_in_fp32():
    out = _out(step=500)
    ref = StructureLoss()(out)["loss_contrastive"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = StructureLoss()(out)["loss_contrastive"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_warmup_as_a_fraction_of_the_run():
    loss_fn = StructureLoss(warmup_fraction=0.25)
    with pytest.raises(RuntimeError, match=r"needs the run's length.*set_run_steps"):
        loss_fn(_out(step=1))
    loss_fn.set_run_steps(140)  # a 1,000-pair run: 35 warm-up steps instead of the fixed 200 it never reached
    assert loss_fn.warmup_steps == 35
    assert loss_fn(_out(step=7))["lambda_structure"].item() == pytest.approx(10.0 * 7 / 35)
    assert loss_fn(_out(step=35))["lambda_structure"].item() == pytest.approx(10.0)
    loss_fn.set_run_steps(780)  # the same share of a longer run
    assert loss_fn.warmup_steps == 195
    assert StructureLoss(warmup_fraction=0.001).set_run_steps(10) is None  # at least one step
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"warmup_fraction must lie in \(0, 1\]"):
            StructureLoss(warmup_fraction=bad)
