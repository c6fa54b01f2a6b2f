"""Layer selection driver (CSV + PNG) and the training-free CCA baseline."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from alignkit.features.csa import CCAAligner
from alignkit.features.select import select_layers


def _planted(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    img = [torch.randn(n, 8, generator=g) for _ in range(3)]
    txt = [torch.randn(n, 6, generator=g) for _ in range(4)]
    img[1] = torch.cat([z @ torch.randn(4, 6, generator=g), 0.1 * torch.randn(n, 2, generator=g)], 1)
    txt[2] = z @ torch.randn(4, 6, generator=g) + 0.1 * torch.randn(n, 6, generator=g)
    return img, txt


@pytest.mark.parametrize("metric", ["mutual_knn", "linear_cka", "unbiased_cka"])
def test_select_best_pair_and_outputs(tmp_path, metric):
    img, txt = _planted()
    i, j, scores, _ = select_layers(img, txt, n_samples=200, metric=metric, seed=1, out_dir=tmp_path)
    assert (i, j) == (1, 2) and scores.shape == (3, 4)
    rows = list(csv.DictReader((tmp_path / "layer_scores.csv").read_text().splitlines()))
    assert len(rows) == 12 and float(rows[1 * 4 + 2][metric]) == pytest.approx(float(scores[1, 2]), abs=1e-6)
    png = (tmp_path / "layer_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_last_mode_and_input_forms():
    img, txt = _planted()
    i, j, _, _ = select_layers(
        {0: img[0], 5: img[1], 9: img[2]}, np.stack([t.numpy() for t in txt], 1), mode="last"
    )
    assert (i, j) == (9, 3)
    i, j, _, _ = select_layers({0: img[0], 5: img[1], 9: img[2]}, txt, mode="best", k=10)
    assert (i, j) == (5, 2)
    with pytest.raises(ValueError, match="paired"):
        select_layers(img, [t[:10] for t in txt])


def test_cca_recovers_planted_subspace():
    g = torch.Generator().manual_seed(0)
    n, k = 2000, 3
    z = torch.randn(n, k, generator=g)
    x = torch.cat([z, torch.randn(n, 7, generator=g)], 1) @ torch.randn(10, 10, generator=g)
    y = torch.cat([z + 0.05 * torch.randn(n, k, generator=g), torch.randn(n, 5, generator=g)], 1)
    y = y @ torch.randn(8, 8, generator=g)
    cca = CCAAligner(dim=k).fit(x[:1500], y[:1500])
    assert cca.correlations.min() > 0.99
    full = CCAAligner(dim=6).fit(x[:1500], y[:1500])
    assert full.correlations[k:].max() < 0.2
    ex, ey = cca.encode_image(x[1500:]), cca.encode_text(y[1500:])
    # The shared space is the planted one: encodings are (nearly) a linear function of z, and pairs match.
    coef = torch.linalg.lstsq(z[1500:], ex).solution
    resid = (ex - z[1500:] @ coef).pow(2).sum() / ex.pow(2).sum()
    assert resid < 0.01
    sims = torch.nn.functional.normalize(ex, dim=-1) @ torch.nn.functional.normalize(ey, dim=-1).T
    assert sims.diagonal().mean() > 0.98 and sims.mean() < 0.1
    assert (sims.argmax(1) == torch.arange(500)).float().mean() > 0.5  # 500 candidates in only 3 dims
    weighted = CCAAligner(dim=k, weighting="corr").fit(x[:1500], y[:1500])
    torch.testing.assert_close(
        weighted.encode_image(x[:5]), cca.encode_image(x[:5]) * cca.correlations.float()
    )
