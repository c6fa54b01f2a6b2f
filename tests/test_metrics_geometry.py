"""Modality gap, alignment, uniformity, positive cosine and the PCA helper, against hand-worked values."""

import math

import pytest
import torch

from alignkit.metrics import (
    alignment,
    gap_l2,
    gap_sq_per_dim,
    geometry_metrics,
    pca_2d,
    positive_cosine,
    uniformity,
)

# Images (2,0), (0,3) normalise to e1, e2; texts (-1,0), (0,-1) are -e1, -e2 (pairs row by row).
IMG = torch.tensor([[2.0, 0], [0, 3]])
TXT = torch.tensor([[-1.0, 0], [0, -1]])


def test_gap_by_hand():
    # centroids (.5,.5) and (-.5,-.5): difference (1,1) -> ‖·‖ = √2, ‖·‖²/d = 2/2 = 1
    assert gap_l2(IMG, TXT) == pytest.approx(math.sqrt(2))
    assert gap_sq_per_dim(IMG, TXT) == pytest.approx(1.0)
    # the gap is computed on normalised embeddings: rescaling rows changes nothing
    assert gap_l2(IMG * torch.tensor([[5.0], [0.1]]), TXT * 7) == pytest.approx(math.sqrt(2))


def test_alignment_and_positive_cosine_by_hand():
    # each pair is antipodal: ‖e1 − (−e1)‖² = 4, cos = −1
    assert alignment(IMG, TXT) == pytest.approx(4.0)
    assert positive_cosine(IMG, TXT) == pytest.approx(-1.0)
    # identical directions: 0 and 1
    assert alignment(IMG, IMG * 3) == pytest.approx(0.0)
    assert positive_cosine(IMG, IMG * 3) == pytest.approx(1.0)


def test_uniformity_by_hand():
    # two orthogonal unit vectors: ‖u−v‖² = 2 -> log exp(−4) = −4
    assert uniformity(IMG) == pytest.approx(-4.0)
    # union ±e1, ±e2: 6 unordered pairs, 4 at ‖u−v‖² = 2 and 2 antipodal at 4
    expected = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)  # = −4.396349
    assert uniformity(torch.cat([IMG, TXT])) == pytest.approx(expected)
    assert expected == pytest.approx(-4.396349, abs=1e-6)
    # collapsed set: every distance 0 -> log 1 = 0 (the maximum; lower is more uniform)
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0, abs=1e-6)


def test_uniformity_matches_wang_isola_formula_and_chunks():
    x = torch.nn.functional.normalize(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    # Wang & Isola 2020 reference: torch.pdist over distinct unordered pairs
    reference = torch.pdist(x).pow(2).mul(-2).exp().mean().log().item()
    for chunk in (1, 7, 1000):
        assert uniformity(x, chunk_size=chunk) == pytest.approx(reference, abs=1e-5)


def test_geometry_metrics_multi_caption_pairs():
    # image 0 has two captions (e1 and −e1), image 1 one caption (e2)
    img = torch.tensor([[1.0, 0], [0, 1]])
    txt = torch.tensor([[1.0, 0], [-1, 0], [0, 1]])
    m = geometry_metrics(img, txt, torch.tensor([0, 0, 1]))
    # pairs: (e1,e1) 0, (e1,−e1) 4, (e2,e2) 0 -> alignment 4/3; cosines 1, −1, 1 -> 1/3
    assert m["alignment"] == pytest.approx(4 / 3)
    assert m["pos_cos"] == pytest.approx(1 / 3)
    # centroids: images (.5,.5); captions (0, 1/3) -> diff (.5, 1/6)
    assert m["l2"] == pytest.approx(math.sqrt(0.25 + 1 / 36))
    assert m["sq_per_dim"] == pytest.approx((0.25 + 1 / 36) / 2)
    assert m["uniformity_img"] == pytest.approx(-4.0)
    assert set(m) == {
        "l2",
        "sq_per_dim",
        "alignment",
        "pos_cos",
        "uniformity_img",
        "uniformity_txt",
        "uniformity_all",
    }


def test_pca_2d_on_planar_data():
    # points on the unit circle in the (e1, e2) plane of R^4, symmetric so the union mean is 0:
    # the 2-D projection must preserve all pairwise distances.
    angles = torch.tensor([0.0, 0.7, 2.0, 3.1416, 3.8416, 5.1416])
    pts = torch.zeros(6, 4)
    pts[:, 0], pts[:, 1] = torch.cos(angles), torch.sin(angles)
    p = pca_2d(pts[:3], pts[3:])
    assert p.image.shape == (3, 2) and p.text.shape == (3, 2) and p.components.shape == (2, 4)
    both = torch.cat([p.image, p.text])
    torch.testing.assert_close(torch.cdist(both, both), torch.cdist(pts, pts), atol=1e-4, rtol=0)
    # first axis carries at least as much variance as the second
    assert both[:, 0].var() >= both[:, 1].var()
    # reusing the basis projects new points with the same mean and axes
    q = pca_2d(pts[:3] * 2, pts[3:], basis=p)
    torch.testing.assert_close(q.image, p.image)
    torch.testing.assert_close(q.components, p.components)
