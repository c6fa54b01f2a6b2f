"""Mutual kNN and CKA against brute-force references."""

from __future__ import annotations

import math
import time

import pytest
import torch

from alignkit.features.similarity import (
    layer_similarity_matrix,
    linear_cka,
    mutual_knn,
    mutual_knn_per_sample,
    resolve_k,
    unbiased_cka,
)


def brute_mutual_knn(x, y, k):
    def neighbours(z):
        z = torch.nn.functional.normalize(z.double(), dim=-1)
        n = z.shape[0]
        out = []
        for i in range(n):
            sims = [(float(z[i] @ z[j]), j) for j in range(n) if j != i]
            sims.sort(reverse=True)
            out.append({j for _, j in sims[:k]})
        return out

    nx, ny = neighbours(x), neighbours(y)
    return sum(len(a & b) / k for a, b in zip(nx, ny)) / len(nx)


def brute_knn_overlaps(x, y, k):
    """Per-sample |N_x(i) ∩ N_y(i)| / k by sorting every row."""

    def neighbours(z):
        z = torch.nn.functional.normalize(z.double(), dim=-1)
        return [
            {
                j
                for _, j in sorted(((float(z[i] @ z[j]), j) for j in range(len(z)) if j != i), reverse=True)[
                    :k
                ]
            }
            for i in range(len(z))
        ]

    return [len(a & b) / k for a, b in zip(neighbours(x), neighbours(y))]


def brute_linear_cka(x, y):
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ (x.double() @ x.double().T) @ h
    l_ = h @ (y.double() @ y.double().T) @ h
    return float((k * l_).sum() / (k.norm() * l_.norm()))


def brute_unbiased_cka(x, y):
    def hsic(k, l_):
        n = k.shape[0]
        k, l_ = k.clone(), l_.clone()
        k.fill_diagonal_(0)
        l_.fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        t1 = torch.trace(k @ l_)
        t2 = (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
        t3 = 2.0 / (n - 2) * (one @ k @ l_ @ one)
        return float((t1 + t2 - t3) / (n * (n - 3)))

    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 3, generator=g)
    x = torch.cat([z, 0.5 * torch.randn(40, 5, generator=g)], 1) + 1.0
    y = z @ torch.randn(3, 6, generator=g) + 0.8 * torch.randn(40, 6, generator=g)
    return x, y


def test_k_rules():
    assert resolve_k("rice", 5000) == 35
    assert resolve_k("sqrt", 5000) == 71
    assert resolve_k("sturges", 5000) == 14
    assert resolve_k(10, 5000) == 10
    with pytest.raises(ValueError, match="rule"):
        resolve_k("scott", 100)
    with pytest.raises(ValueError, match="k="):
        resolve_k(100, 50)


@pytest.mark.parametrize("k", [1, 4, "rice"])
def test_mutual_knn_brute_force(data, k):
    x, y = data
    assert mutual_knn(x, y, k) == pytest.approx(brute_mutual_knn(x, y, resolve_k(k, 40)), abs=1e-9)
    assert mutual_knn(x, x, k) == pytest.approx(1.0)


def test_mutual_knn_per_sample_brute_force(data):
    x, y = data
    per = mutual_knn_per_sample([x, y], [y], k=4)
    assert per.shape == (2, 1, 40)
    torch.testing.assert_close(per[0, 0], torch.tensor(brute_knn_overlaps(x, y, 4), dtype=torch.float64))
    torch.testing.assert_close(per[1, 0], torch.ones(40, dtype=torch.float64))
    assert per[0, 0].mean().item() == pytest.approx(mutual_knn(x, y, 4), abs=1e-12)


def test_cka_brute_force(data):
    x, y = data
    assert linear_cka(x, y) == pytest.approx(brute_linear_cka(x, y), rel=1e-9)
    assert unbiased_cka(x, y) == pytest.approx(brute_unbiased_cka(x, y), rel=1e-9)


def test_cka_orthogonal_invariance(data):
    x, _ = data
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert linear_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-9)
    assert unbiased_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3.0 * x) == pytest.approx(1.0, abs=1e-9)


def test_matrix_matches_pairwise_and_blocks():
    g = torch.Generator().manual_seed(1)
    fa = [torch.randn(37, d, generator=g) for d in (4, 6, 5)]
    fb = [torch.randn(37, d, generator=g) for d in (3, 7)]
    fb[1][:, :4] += fa[1][:, :4] * 3
    for metric, brute in [
        ("mutual_knn", lambda a, b: brute_mutual_knn(a, b, 5)),
        ("linear_cka", brute_linear_cka),
        ("unbiased_cka", brute_unbiased_cka),
    ]:
        m = layer_similarity_matrix(fa, fb, metric, k=5, block=8)  # several row blocks, fp32
        want = torch.tensor([[brute(a, b) for b in fb] for a in fa], dtype=torch.float64)
        torch.testing.assert_close(m, want, rtol=1e-4, atol=1e-5)
    assert m.argmax().item() == 1 * 2 + 1


@pytest.mark.slow
def test_matrix_speed_smoke():
    """A 12 × 13 layer grid on 2,000 samples stays in seconds on 2 CPU cores (not a benchmark)."""
    fa = [torch.randn(2000, 256) for _ in range(12)]
    fb = [torch.randn(2000, 192) for _ in range(13)]
    t0 = time.perf_counter()
    m = layer_similarity_matrix(fa, fb, "mutual_knn", k="rice")
    assert m.shape == (12, 13)
    assert time.perf_counter() - t0 < 60
