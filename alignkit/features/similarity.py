"""Representational similarity between two feature sets of the same n samples: mutual kNN and (unbiased) CKA.

``layer_similarity_matrix`` scores every (layer_a, layer_b) pair. Each layer's n×n object (kNN index sets, or
centred Gram rows) is computed once per layer, never once per pair: for kNN the index sets of all layers are kept
((n, k) each) and the pair score is a gather; for CKA the Gram matrices are built in row blocks for all layers and
all pairwise Frobenius products are accumulated block by block with one matmul, so memory stays
O(L · block · n) instead of O(L · n²).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["mutual_knn", "linear_cka", "unbiased_cka"]
KRule = Literal["rice", "sqrt", "sturges"] | int

__all__ = [
    "layer_similarity_matrix",
    "linear_cka",
    "mutual_knn",
    "mutual_knn_per_sample",
    "resolve_k",
    "unbiased_cka",
]


def resolve_k(k: KRule, n: int) -> int:
    """Neighbourhood size from a rule: Rice ⌈2n^{1/3}⌉, sqrt ⌈√n⌉, Sturges ⌈log2 n⌉+1, or a fixed int."""
    if isinstance(k, bool):
        raise TypeError("k must be an int or one of 'rice', 'sqrt', 'sturges'")
    if isinstance(k, int):
        value = k
    elif k == "rice":
        value = math.ceil(2 * n ** (1 / 3))
    elif k == "sqrt":
        value = math.ceil(math.sqrt(n))
    elif k == "sturges":
        value = math.ceil(math.log2(n)) + 1
    else:
        raise ValueError(f"unknown k rule {k!r}; use 'rice', 'sqrt', 'sturges' or an int")
    if not 1 <= value < n:
        raise ValueError(f"k={value} must be in [1, n-1] for n={n}")
    return value


def _knn_indices(x: Tensor, k: int, block: int = 1024) -> Tensor:
    """(n, k) indices of each row's k nearest neighbours by cosine similarity, self excluded."""
    x = F.normalize(x.float(), dim=-1)
    n = x.shape[0]
    out = []
    for s in range(0, n, block):
        sim = x[s : s + block] @ x.T
        rows = torch.arange(s, min(s + block, n), device=x.device)
        sim[rows - s, rows] = float("-inf")
        out.append(sim.topk(k, dim=-1).indices)
    return torch.cat(out)


def _mutual_knn_per_sample(idx_a: list[Tensor], idx_b: list[Tensor], n: int, k: int) -> Tensor:
    """(La, Lb, n) fp64: |N_a(i) ∩ N_b(i)| / k for every layer pair and sample i."""
    device = idx_a[0].device
    all_b = torch.cat(idx_b, dim=1)  # (n, Lb * k): every B layer scored by one gather
    rows = []
    for ia in idx_a:
        member = torch.zeros(
            n, n, dtype=torch.bool, device=device
        )  # one dense membership mask per layer of A
        member.scatter_(1, ia, True)
        hits = member.gather(1, all_b).view(n, len(idx_b), k)
        rows.append(hits.sum(dim=2, dtype=torch.float64).T / k)
    return torch.stack(rows).cpu()


def _gram_block(x: Tensor, rows: slice, kind: str, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    """Rows ``rows`` of the centred (linear) or U-centred (unbiased) Gram matrix of ``x``."""
    g = x[rows] @ x.T
    if kind == "linear":
        return g  # x is already column-centred, so x x^T is the doubly-centred Gram H K H.
    n = x.shape[0]
    row_sums, total = stats
    idx = torch.arange(rows.start, rows.start + g.shape[0], device=g.device)
    g[idx - rows.start, idx] = 0.0
    g = g - row_sums[rows, None] / (n - 2) - row_sums[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    g[idx - rows.start, idx] = 0.0
    return g


def _prep_cka(x: Tensor, kind: str, dtype: torch.dtype) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    x = x.double()
    if kind == "linear":
        return (x - x.mean(dim=0, keepdim=True)).to(dtype), None
    # Row sums of the Gram with zeroed diagonal, without forming it: K1 - diag(K).
    row_sums = x @ x.sum(dim=0) - (x * x).sum(dim=1)
    return x.to(dtype), (row_sums.to(dtype), row_sums.sum().to(dtype))


def _cka_scores(
    feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], kind: str, block: int, dtype: torch.dtype
) -> Tensor:
    n = feats_a[0].shape[0]
    if kind == "unbiased" and n < 4:
        raise ValueError("unbiased CKA needs n >= 4")
    preps = [_prep_cka(f, kind, dtype) for f in [*feats_a, *feats_b]]
    la = len(feats_a)
    cross = torch.zeros(len(preps), len(preps), dtype=torch.float64, device=preps[0][0].device)
    for s in range(0, n, block):
        rows = slice(s, min(s + block, n))
        # Every layer's Gram block is computed once, then all pair products in one matmul.
        flat = torch.stack([_gram_block(x, rows, kind, st).reshape(-1) for x, st in preps])
        cross += (flat @ flat.T).double()  # accumulate across blocks in fp64
    diag = cross.diagonal().clamp_min(1e-300)
    a_norm, b_norm = diag[:la].sqrt(), diag[la:].sqrt()
    return (cross[:la, la:] / (a_norm[:, None] * b_norm[None, :])).cpu()


def layer_similarity_matrix(
    feats_a: Sequence[Tensor],
    feats_b: Sequence[Tensor],
    metric: Metric = "mutual_knn",
    k: KRule = "rice",
    block: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """(len(feats_a), len(feats_b)) fp64 scores; ``feats_*[l]`` is layer l's (n, D_l) features on the same n samples.

    ``dtype`` is the CKA Gram-block precision (block sums are accumulated in fp64 either way); ``device``
    (default: where the features are) is where the n×n work runs. The result is on the CPU.
    """
    if not feats_a or not feats_b:
        raise ValueError("need at least one layer on each side")
    n = feats_a[0].shape[0]
    if any(f.shape[0] != n for f in [*feats_a, *feats_b]):
        raise ValueError("all layers must hold the same n samples (rows must be paired)")
    feats_a = [torch.as_tensor(f).to(device) for f in feats_a]
    feats_b = [torch.as_tensor(f).to(device) for f in feats_b]
    if metric == "mutual_knn":
        return mutual_knn_per_sample(feats_a, feats_b, k, block).mean(dim=2)
    if metric in ("linear_cka", "unbiased_cka"):
        return _cka_scores(feats_a, feats_b, metric.split("_")[0], block, dtype)
    raise ValueError(f"unknown metric {metric!r}; use 'mutual_knn', 'linear_cka' or 'unbiased_cka'")


def mutual_knn_per_sample(
    feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], k: KRule = "rice", block: int = 256
) -> Tensor:
    """(len(feats_a), len(feats_b), n) fp64 per-sample mutual-kNN overlaps |N_a(i) ∩ N_b(i)| / k; their mean over
    samples is the mutual-kNN score. The per-sample terms are what a bootstrap of the score resamples."""
    n = feats_a[0].shape[0]
    kk = resolve_k(k, n)
    return _mutual_knn_per_sample(
        [_knn_indices(torch.as_tensor(f), kk, block) for f in feats_a],
        [_knn_indices(torch.as_tensor(f), kk, block) for f in feats_b],
        n,
        kk,
    )


def mutual_knn(x: Tensor, y: Tensor, k: KRule = "rice") -> float:
    """Mean over samples of |N_k^x(i) ∩ N_k^y(i)| / k, cosine kNN with self excluded (Huh et al.)."""
    return layer_similarity_matrix([x], [y], "mutual_knn", k).item()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA: <HKH, HLH>_F / (‖HKH‖_F ‖HLH‖_F) with K = xxᵀ, L = yyᵀ."""
    return layer_similarity_matrix([x], [y], "linear_cka", dtype=torch.float64).item()


def unbiased_cka(x: Tensor, y: Tensor) -> float:
    """CKA from the unbiased HSIC estimator (Song et al. 2012) on linear kernels."""
    return layer_similarity_matrix([x], [y], "unbiased_cka", dtype=torch.float64).item()
