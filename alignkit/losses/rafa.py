"""Random Feature Alignment (RaFA, CLIP-Refine): pull both modalities toward shared random reference vectors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from alignkit.core.distributed import rank, world_size
from alignkit.losses.common import check_choice, maybe_normalize

Prior = Literal["normal", "uniform", "data_stats"]
Reduction = Literal["mean", "paper"]


def load_feature_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension ``mean`` and ``std`` from a ``.npz`` or ``.pt`` file (e.g. written by scripts/feature_stats.py)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RaFA prior=data_stats: stats file {path} not found (expects arrays 'mean' and 'std')"
        )
    data = np.load(path) if path.suffix == ".npz" else torch.load(path, map_location="cpu", weights_only=True)
    try:
        mean, std = data["mean"], data["std"]
    except KeyError as e:
        raise KeyError(
            f"RaFA stats file {path} lacks {e}; it must hold 'mean' and 'std' of shape (d,)"
        ) from None
    return torch.as_tensor(np.asarray(mean), dtype=torch.float32), torch.as_tensor(
        np.asarray(std), dtype=torch.float32
    )


class RandomFeatureAlignment(nn.Module):
    """L_RaFA between features and reference vectors r ~ p(z), drawn fresh every step.

    Defaults follow the released code (``strategy: std_sample``): N(0, I) prior, one reference per pair *shared* by
    its image and text, raw (unnormalised) features, and PyTorch mean-reduced MSE per modality, summed over the two
    modalities: (1/(B·d))‖Z_img − R‖² + (1/(B·d))‖Z_txt − R‖². ``reduction=paper`` gives the paper's
    (1/(2B)) Σ_i (‖z_img − r‖² + ‖z_txt − r‖²), which is the code's value × d/2 — port λ accordingly.

    Args:
        prior: ``normal`` N(mean, (β·std)²), ``uniform`` U(low, high) scaled by β about its centre, or ``data_stats``
            (Gaussian with per-dimension mean/std from ``stats_path``, std scaled by β).
        beta: spread multiplier; ``beta_scales`` says whether β multiplies the std (default) or the variance.
        shared: one reference per pair for both modalities (released default) or independent draws.
        seed: references come from a generator seeded by (seed, step), drawn for the whole global batch and sliced
            by rank, so runs are reproducible, resume exactly, and 2 ranks draw what 1 process would.
    """

    requires_teacher = False

    def __init__(
        self,
        prior: Prior = "normal",
        mean: float = 0.0,
        std: float = 1.0,
        low: float = -1.0,
        high: float = 1.0,
        beta: float = 1.0,
        beta_scales: Literal["std", "variance"] = "std",
        shared: bool = True,
        normalize: bool = False,
        reduction: Reduction = "mean",
        stats_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("prior", prior, ("normal", "uniform", "data_stats"))
        check_choice("reduction", reduction, ("mean", "paper"))
        check_choice("beta_scales", beta_scales, ("std", "variance"))
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.prior, self.shared, self.normalize, self.reduction, self.seed = (
            prior,
            shared,
            normalize,
            reduction,
            seed,
        )
        self.spread = beta if beta_scales == "std" else math.sqrt(beta)
        self.mean = mean
        self.std = std
        self.low = low
        self.high = high
        if prior == "data_stats":
            if stats_path is None:
                raise ValueError(
                    "prior=data_stats needs stats_path (a .npz/.pt with per-dimension 'mean' and 'std')"
                )
            m, s = load_feature_stats(stats_path)
            self.register_buffer("stats_mean", m, persistent=False)
            self.register_buffer("stats_std", s, persistent=False)

    def sample(self, n: int, d: int, step: int, device: torch.device, stream: int = 0) -> torch.Tensor:
        """Reference vectors for the *global* batch of ``n`` rows at ``step``; ``stream`` separates independent draws."""
        gen = torch.Generator(device="cpu").manual_seed(
            hash((self.seed, step, stream)) & 0x7FFF_FFFF_FFFF_FFFF
        )
        if self.prior == "uniform":
            r = torch.rand(n, d, generator=gen) * (self.high - self.low) + self.low
            centre = 0.5 * (self.high + self.low)
            r = centre + self.spread * (r - centre)
        else:
            r = torch.randn(n, d, generator=gen)
            if self.prior == "normal":
                r = self.mean + self.spread * self.std * r
            else:
                if self.stats_mean.shape[0] != d:
                    raise ValueError(
                        f"RaFA stats have dimension {self.stats_mean.shape[0]} but features have {d}"
                    )
                r = self.stats_mean.cpu() + self.spread * self.stats_std.cpu() * r
        return r.to(device)

    def _references(self, feats: torch.Tensor, step: int, stream: int) -> torch.Tensor:
        b, d = feats.shape
        r = self.sample(b * world_size(), d, step, feats.device, stream)
        return r[rank() * b : (rank() + 1) * b].to(feats.dtype)

    def _distance(self, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        sq = (z - r).pow(2)
        return sq.mean() if self.reduction == "mean" else 0.5 * sq.sum(dim=1).mean()

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        img = maybe_normalize(out["image_features"], self.normalize)
        txt = maybe_normalize(out["text_features"], self.normalize)
        step = int(out.get("step", 0))
        r_img = self._references(img, step, 0)
        r_txt = r_img if self.shared else self._references(txt, step, 1)
        li, lt = self._distance(img, r_img), self._distance(txt, r_txt)
        return {"loss": li + lt, "image": li.detach(), "text": lt.detach()}
