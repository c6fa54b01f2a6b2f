"""Training-free CCA / CSA-style baseline on cached features (no cca-zoo).

Centre both modalities, whiten each with its regularised covariance ``C^{-1/2}``, take the SVD of the whitened
cross-covariance ``Cxx^{-1/2} Cxy Cyy^{-1/2} = U S Vᵀ`` and project onto the top ``dim`` canonical directions.
``weighting="corr"`` scales canonical dimension i by its correlation ``s_i`` (CSA's similarity weighting,
computed but unused by STRUCTURE's released evaluation, whose default we follow with ``"none"``).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["CCAAligner"]


def _inv_sqrt(c: Tensor, reg: float) -> Tensor:
    c = c + reg * torch.eye(c.shape[0], dtype=c.dtype) * c.diagonal().mean().clamp_min(1e-12)
    vals, vecs = torch.linalg.eigh(c)
    return vecs @ torch.diag(vals.clamp_min(1e-12).rsqrt()) @ vecs.T


class CCAAligner:
    """Analytic CCA projections to a shared ``dim``; ``fit`` then ``encode_image`` / ``encode_text``."""

    def __init__(
        self, dim: int = 512, reg: float = 1e-4, weighting: Literal["none", "corr"] = "none"
    ) -> None:
        if weighting not in ("none", "corr"):
            raise ValueError(f"weighting must be 'none' or 'corr', got {weighting!r}")
        self.dim = dim
        self.reg = reg
        self.weighting = weighting
        self.mean_x = self.mean_y = self.proj_x = self.proj_y = self.correlations = None

    def fit(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> CCAAligner:
        """Fit on paired rows ``x`` (n, Dx) and ``y`` (n, Dy) in fp64."""
        x, y = (
            torch.as_tensor(np.asarray(x), dtype=torch.float64),
            torch.as_tensor(np.asarray(y), dtype=torch.float64),
        )
        if x.shape[0] != y.shape[0]:
            raise ValueError("x and y must have the same number of (paired) rows")
        dim = min(self.dim, x.shape[1], y.shape[1])
        if dim < self.dim:
            log.warning("CCA dim %d capped at %d by the feature sizes", self.dim, dim)
        self.mean_x, self.mean_y = x.mean(0), y.mean(0)
        xc, yc = x - self.mean_x, y - self.mean_y
        n = x.shape[0] - 1
        wx, wy = _inv_sqrt(xc.T @ xc / n, self.reg), _inv_sqrt(yc.T @ yc / n, self.reg)
        u, s, vh = torch.linalg.svd(wx @ (xc.T @ yc / n) @ wy, full_matrices=False)
        self.proj_x, self.proj_y = wx @ u[:, :dim], wy @ vh.T[:, :dim]
        self.correlations = s[:dim].clamp(0.0, 1.0)
        return self

    def _encode(self, z: Tensor | np.ndarray, mean: Tensor | None, proj: Tensor | None) -> Tensor:
        if proj is None or mean is None:
            raise RuntimeError("call fit() first")
        out = (torch.as_tensor(np.asarray(z), dtype=torch.float64) - mean) @ proj
        if self.weighting == "corr":
            out = out * self.correlations
        return out.float()

    def encode_image(self, x: Tensor | np.ndarray) -> Tensor:
        return self._encode(x, self.mean_x, self.proj_x)

    def encode_text(self, y: Tensor | np.ndarray) -> Tensor:
        return self._encode(y, self.mean_y, self.proj_y)
