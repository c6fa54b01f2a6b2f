"""STRUCTURE: InfoNCE on aligned heads plus the structure-preserving regulariser R_S.

Reference: "With Limited Data for Multimodal Alignment, Let the STRUCTURE Guide You" (Gröger, Wen, Le, Brbić,
NeurIPS 2025, arXiv 2506.16895; released code ``mlbio-epfl/STRUCTURE``, read at upstream commit ``f747207`` as
preserved in the fork ``shiwonkim/structure``, function ``structure_reg``). Where the released code and the paper
differ, every such choice is a keyword here and each default says which variant it follows.

R_S for one modality, original batch X (B, D) and aligned batch A = f(X) (B, d)::

    X~, A~  = centre(normalise(.))            (or normalise(centre(.)) with center_first=True)
    P       = row_softmax(sim(Z~, Z~) / tau)  (optionally with the self-similarity masked out)
    R_S     = 1/L * sum_l w_l * relu(Div(P_X^l, P_A^l) - margin)

where ``P^l`` is the l-th matrix power (l-hop random walk) and Div sums the row divergences and divides by B.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.core.distributed import all_gather_with_grad
from alignkit.losses.common import CrossRank
from alignkit.losses.contrastive import InfoNCE

Weighting = Literal["none", "inverse"]
Centering = Literal["none", "mean", "standard"]
Similarity = Literal["cosine", "rbf"]
Divergence = Literal["kl_from_midpoint", "js"]
ModalityReduction = Literal["mean", "sum"]

__all__ = ["StructureLoss", "row_divergence", "structure_regularizer", "transition_matrix"]


def _center(z: Tensor, centering: str, eps: float) -> Tensor:
    if centering == "none":
        return z
    z = z - z.mean(dim=0, keepdim=True)
    if centering == "mean":
        return z
    if centering == "standard":
        # Per-dimension z-score over the batch (population std, as a batch statistic).
        return z / (z.std(dim=0, unbiased=False, keepdim=True) + eps)
    raise ValueError(f"centering must be 'none', 'mean' or 'standard', got {centering!r}")


def transition_matrix(
    z: Tensor,
    *,
    centering: Centering = "mean",
    center_first: bool = False,
    similarity: Similarity = "cosine",
    tau: float = 0.05,
    rbf_gamma: float = 1.0,
    mask_diagonal: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Row-stochastic (B, B) similarity random walk of one batch (fp32)."""
    if center_first:
        z = F.normalize(_center(z, centering, eps), dim=-1, eps=eps)
    else:
        z = _center(F.normalize(z, dim=-1, eps=eps), centering, eps)
    if similarity == "cosine":
        # After centring the rows are no longer unit norm: this is the released "centred cosine".
        sim = z @ z.T
    elif similarity == "rbf":
        # Kernel value in [0, 1] plays the role of the cosine; divided by tau like it (our reading of the code).
        sim = torch.exp(-rbf_gamma * torch.cdist(z, z).pow(2))
    else:
        raise ValueError(f"similarity must be 'cosine' or 'rbf', got {similarity!r}")
    logits = sim / tau
    if mask_diagonal:
        eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
    return logits.softmax(dim=-1)


def row_divergence(p_x: Tensor, p_a: Tensor, divergence: Divergence, eps: float = 1e-12) -> Tensor:
    """Sum over rows of the per-row divergence, divided by B."""
    m = 0.5 * (p_x + p_a)

    def kl(p: Tensor, q: Tensor) -> Tensor:
        # eps inside both logs, as in the released code; 0 * log(eps) terms vanish.
        return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=-1)

    if divergence == "js":
        rows = 0.5 * (kl(p_a, m) + kl(p_x, m))
    elif divergence == "kl_from_midpoint":
        # Released code: F.kl_div argument order yields KL(M || P), not JS.
        rows = 0.5 * (kl(m, p_a) + kl(m, p_x))
    else:
        raise ValueError(f"divergence must be 'kl_from_midpoint' or 'js', got {divergence!r}")
    return rows.sum() / p_x.shape[0]


def structure_regularizer(
    x: Tensor,
    a: Tensor,
    *,
    levels: int = 1,
    weighting: Weighting = "none",
    divergence: Divergence = "kl_from_midpoint",
    margin: float = 0.0,
    eps: float = 1e-12,
    **walk: Any,
) -> Tensor:
    """R_S between an original batch ``x`` (B, D) and its aligned version ``a`` (B, d).

    ``walk`` holds the options of :func:`transition_matrix` (``centering``, ``center_first``, ``similarity``,
    ``tau``, ``rbf_gamma``, ``mask_diagonal``), the same for both batches. Runs in fp32 with autocast disabled.
    Defaults are the released code's (``structure_1``: L=1, no weighting, mean centring after normalisation,
    cosine, τ=0.05, diagonal kept, KL from the midpoint, margin 0).
    """
    if x.shape[0] != a.shape[0]:
        raise ValueError(f"x and a must have the same batch size, got {x.shape[0]} and {a.shape[0]}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if weighting not in ("none", "inverse"):
        raise ValueError(f"weighting must be 'none' or 'inverse', got {weighting!r}")
    # Softmax over tau=0.05 logits and matrix powers are precision-sensitive: force fp32.
    with torch.autocast(device_type=x.device.type, enabled=False):
        p_x = transition_matrix(x.float(), eps=eps, **walk)
        p_a = transition_matrix(a.float(), eps=eps, **walk)
        total = x.new_zeros((), dtype=torch.float32)
        px_l, pa_l = p_x, p_a
        for level in range(1, levels + 1):
            if level > 1:
                px_l, pa_l = px_l @ p_x, pa_l @ p_a
            div = F.relu(row_divergence(px_l, pa_l, divergence, eps) - margin)
            weight = 1.0 if weighting == "none" else 1.0 / level
            total = total + weight * div
        return total / levels


class StructureLoss(nn.Module):
    """InfoNCE (fixed τ, normalised outputs) + λ_t · R_S, the STRUCTURE objective.

    ``forward(out)`` reads ``image_features``/``text_features`` (head outputs, unnormalised),
    ``image_inputs``/``text_inputs`` (frozen features of the selected layers) and ``step`` (the global optimiser
    step, int or 0-d tensor) which drives the linear λ warm-up ``λ_t = λ·min(1, step / warmup_steps)``. ``step``
    is required while a warm-up is active (``warmup_steps > 0``) so that a forgotten step never silently
    trains with λ=0; it may be omitted when ``warmup_steps == 0``. ``warmup_fraction`` (in (0, 1]) sets the
    warm-up as a share of the run instead: ``warmup_steps = max(1, round(fraction × run steps))``, the run's
    optimizer steps coming from the training module (:meth:`set_run_steps`), so that a short run (few pairs)
    reaches full λ at the same point of its schedule as a long one.

    Across ranks, InfoNCE is :class:`alignkit.losses.InfoNCE` with ``cross_rank`` (default ``gather_local_loss``:
    global negatives, open_clip's local loss). R_S is computed on each rank's own batch unless
    ``gather_structure``, which gathers inputs and head outputs (with gradient) so that every rank computes R_S
    on the global batch (the update then equals one process on the whole batch). On one process both are the
    same. With ``use_structure=False`` the R_S terms are still computed (without gradient) for monitoring and
    ``lambda_structure`` is reported as 0.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        lambda_structure: float = 10.0,
        warmup_steps: int = 1000,
        warmup_fraction: float | None = None,
        levels: int = 1,
        weighting: Weighting = "none",
        centering: Centering = "mean",
        center_first: bool = False,
        similarity: Similarity = "cosine",
        structure_tau: float | None = None,
        rbf_gamma: float = 1.0,
        mask_diagonal: bool = False,
        divergence: Divergence = "kl_from_midpoint",
        margin: float = 0.0,
        modality_reduction: ModalityReduction = "mean",
        use_structure: bool = True,
        gather_structure: bool = False,
        cross_rank: CrossRank = "gather_local_loss",
        eps: float = 1e-12,
    ) -> None:
        """Defaults follow the released code: τ=0.05 shared by InfoNCE and R_S (``structure_tau=None``),
        λ=10 with 1,000 warm-up steps, L=1 unweighted, mean centring after normalisation, cosine, diagonal
        kept, KL from the midpoint (paper: ``"js"``), modality terms averaged (paper: ``"sum"``)."""
        super().__init__()
        if modality_reduction not in ("mean", "sum"):
            raise ValueError(f"modality_reduction must be 'mean' or 'sum', got {modality_reduction!r}")
        if warmup_steps < 0 or temperature <= 0:
            raise ValueError("warmup_steps must be >= 0 and temperature > 0")
        self.temperature = temperature
        self.lambda_structure = lambda_structure
        if warmup_fraction is not None and not 0 < warmup_fraction <= 1:
            raise ValueError(
                f"warmup_fraction must lie in (0, 1] (a share of the run), got {warmup_fraction}"
            )
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.run_steps: int | None = None
        self.modality_reduction = modality_reduction
        self.use_structure = use_structure
        self.gather_structure = gather_structure
        # fixed τ on normalised outputs, no logit scale; fp32 inputs (see forward)
        self.infonce = InfoNCE(
            normalize=True, logit_scale="none", temperature=temperature, cross_rank=cross_rank
        )
        self.rs_kwargs = dict(
            levels=levels,
            weighting=weighting,
            centering=centering,
            center_first=center_first,
            similarity=similarity,
            tau=temperature if structure_tau is None else structure_tau,
            rbf_gamma=rbf_gamma,
            mask_diagonal=mask_diagonal,
            divergence=divergence,
            margin=margin,
            eps=eps,
        )

    def set_run_steps(self, total: int) -> None:
        """The run's optimizer steps (from the training module); fixes the warm-up when ``warmup_fraction`` is set."""
        self.run_steps = int(total)
        if self.warmup_fraction is not None:
            self.warmup_steps = max(1, round(self.warmup_fraction * self.run_steps))

    def current_lambda(self, step: int | Tensor | None) -> float:
        """λ_t = λ · min(1, step / warmup_steps)."""
        if not self.use_structure:
            return 0.0
        if self.warmup_fraction is not None and self.run_steps is None:
            raise RuntimeError(
                "StructureLoss(warmup_fraction=...) needs the run's length: the training module sets it when the "
                "optimizers are configured; outside a Trainer call loss.set_run_steps(N) first"
            )
        if self.warmup_steps == 0:
            return float(self.lambda_structure)
        if step is None:
            raise KeyError(
                "StructureLoss needs out['step'] (the global step) while warmup_steps > 0; "
                "pass it or set warmup_steps=0"
            )
        return float(self.lambda_structure) * min(1.0, float(step) / self.warmup_steps)

    def forward(self, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        a_img, a_txt = out["image_features"], out["text_features"]
        # τ = 0.05 logits are precision-sensitive: InfoNCE in fp32 with autocast off, like R_S
        with torch.autocast(device_type=a_img.device.type, enabled=False):
            loss_c = self.infonce({"image_features": a_img.float(), "text_features": a_txt.float()})["loss"]
        lam = self.current_lambda(out.get("step"))

        x_img, x_txt = out["image_inputs"], out["text_inputs"]
        if self.gather_structure:
            x_img, x_txt, a_img, a_txt = (all_gather_with_grad(t) for t in (x_img, x_txt, a_img, a_txt))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.use_structure):
            r_img = structure_regularizer(x_img, a_img, **self.rs_kwargs)
            r_txt = structure_regularizer(x_txt, a_txt, **self.rs_kwargs)
        r = r_img + r_txt
        if self.modality_reduction == "mean":
            r = 0.5 * r
        loss = loss_c + lam * r if self.use_structure else loss_c
        return {
            "loss": loss,
            "loss_contrastive": loss_c,
            "loss_structure": r,
            "loss_structure_image": r_img,
            "loss_structure_text": r_txt,
            "lambda_structure": torch.tensor(lam, device=loss.device),
        }
