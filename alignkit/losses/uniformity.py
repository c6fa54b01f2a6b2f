"""The uniformity estimator log E_{i≠j} w_ij·exp(−t‖z_i − z_j‖²) over a batch, exact across ranks.

Shared by :class:`alignkit.losses.align_uniform.Uniformity` (w = 1, Wang & Isola 2020) and
:class:`alignkit.losses.calibrated_uniformity.CalibratedUniformity` (CM³'s similarity-calibrated weights).

Unlike InfoNCE, this loss is the log of a mean over *all* pairs of the global batch, so a mean of per-rank losses
is not the global loss. ``gather_local_loss`` keeps the memory of a local loss (rows = this rank's samples, columns
= the batch gathered with gradient) and still gives the exact global value and gradient, see
:func:`log_mean_pair_kernel`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from alignkit.core.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size
from alignkit.losses.common import CROSS_RANK_CHOICES, CrossRank, check_choice

PairLogWeight = Callable[[Tensor, Tensor], Tensor]

__all__ = ["log_mean_pair_kernel", "squared_distances"]


def squared_distances(rows: Tensor, cols: Tensor) -> Tensor:
    """‖r_i − c_j‖² for every (row, column), (R, C). Expanded rather than ``cdist`` so that no square root (and no
    undefined gradient at zero distance on the masked diagonal) enters the graph; clamped against rounding."""
    sq = rows.pow(2).sum(-1, keepdim=True) + cols.pow(2).sum(-1).unsqueeze(0) - 2.0 * rows @ cols.T
    return sq.clamp_min(0.0)


def log_mean_pair_kernel(
    z: Tensor,
    t: float,
    cross_rank: CrossRank = "gather_local_loss",
    attrs: Tensor | None = None,
    pair_log_weight: PairLogWeight | None = None,
) -> Tensor:
    """log( 1/(N(N−1)) · Σ_{i≠j} w_ij · exp(−t‖z_i − z_j‖²) ) over the N samples of the batch (fp32 inside).

    ``z`` is this rank's (B, d) batch. ``attrs`` (B, k) are per-sample attributes that ``pair_log_weight(a_rows,
    a_cols)`` turns into log w for every (row, column); they are gathered without gradient (CM³'s similarities are
    targets, not trained). ``cross_rank``:

    * ``local``: the batch is this rank's own (N = B);
    * ``gather_global_loss``: every rank computes the loss over the gathered batch (N = B·world);
    * ``gather_local_loss``: rows are this rank's samples, columns the gathered batch. With S_r this rank's kernel
      sum and S = Σ_r S_r (one scalar all-gather, no gradient), rank r returns
      ``log(S/M) + world·S_r/sg(S) − 1``: its value averages over ranks to the global log-mean, and the gradient
      DDP averages is exactly d log S (tested on 2 processes).
    """
    check_choice("cross_rank", cross_rank, CROSS_RANK_CHOICES)
    if (attrs is None) != (pair_log_weight is None):
        raise ValueError("attrs and pair_log_weight go together: pass both or neither")
    # exp(−t·d²) spans many orders of magnitude for large t or raw features: log domain, fp32, autocast off
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        world = world_size()
        rows, cols, a_rows, a_cols, offset = z, z, attrs, attrs, 0
        if cross_rank != "local" and world > 1:
            cols = all_gather_with_grad(z)
            a_cols = all_gather_no_grad(attrs) if attrs is not None else None
            if cross_rank == "gather_global_loss":
                rows, a_rows = cols, a_cols
            else:
                offset = rank() * z.shape[0]
        n = cols.shape[0]
        if n < 2:
            raise ValueError("uniformity needs at least two samples in the batch")
        log_k = -t * squared_distances(rows, cols)
        if pair_log_weight is not None:
            log_k = log_k + pair_log_weight(a_rows.float(), a_cols.float())
        idx = torch.arange(rows.shape[0], device=z.device)
        diag = torch.zeros_like(log_k, dtype=torch.bool)
        diag[idx, idx + offset] = True  # a sample with itself is not a pair
        local_lse = torch.logsumexp(log_k.masked_fill(diag, float("-inf")).flatten(), dim=0)
        log_pairs = math.log(n * (n - 1))
        if cross_rank != "gather_local_loss" or world == 1:
            return local_lse - log_pairs
        global_lse = torch.logsumexp(all_gather_no_grad(local_lse.detach().reshape(1)), dim=0)
        # value: mean over ranks of world·S_r/S − 1 is 0; gradient: world·dS_r/S, averaged by DDP → dS/S = d log S
        return global_lse - log_pairs + world * torch.exp(local_lse - global_lse) - 1.0
