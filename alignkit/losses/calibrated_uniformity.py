"""Calibrated uniformity (CM³: Zhou, Wang, Shen 2025, "CM³: Calibrating Multimodal Recommendation").

Plain uniformity pushes every pair of samples apart equally. CM³ shifts each pair's squared distance by the
distance their (frozen) multimodal attributes already have on the sphere, 2 − 2·s_ij::

    L_cu = log E_{i≠j} exp(−t·(‖z_i − z_j‖² − 2 + 2·s_ij))
         = log E_{i≠j} w_ij · exp(−t‖z_i − z_j‖²),     w_ij = exp(2·t·(1 − s_ij))

so the repulsion of a pair is scaled by w_ij: dissimilar pairs (s = 0) are pushed apart e^{2t} times harder than
identical ones (s = 1). With s ≡ 1 it is plain uniformity; with s ≡ 0 it is plain uniformity + 2t (tested).

What CM³ leaves to the setting (recommendation items with fused image + text features) is an option here:

* ``source``: which attributes give s — ``inputs`` (the frozen encoder features of the STRUCTURE path,
  ``image_inputs`` / ``text_inputs``; default), ``teacher`` (the frozen teacher's embeddings on the CLIP-Refine path)
  or ``features`` (the model's own embeddings, detached);
* ``combine``: ``fused`` (default; s = ½(cos_img + cos_txt), i.e. the cosine of the two unit attributes
  concatenated: one multimodal similarity per pair, as CM³ uses its fused item features) or ``per_modality`` (the
  image embeddings are calibrated by image-attribute similarity, the text embeddings by text-attribute similarity);
* ``similarity_map``: cosine → s ∈ [0, 1] by ``clamp`` (max(cos, 0), default: negatively related pairs count as
  unrelated) or ``affine`` ((1 + cos)/2);
* ``strength`` β multiplies the calibration, log w = β·2t(1 − s) (β = 1 is CM³; β = 0 is plain uniformity).

The similarities are targets (no gradient). Both modalities' embeddings get the calibrated term, combined by
``modality_reduction``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.losses.common import CrossRank, check_choice, maybe_normalize
from alignkit.losses.uniformity import log_mean_pair_kernel

Source = Literal["inputs", "teacher", "features"]
Combine = Literal["fused", "per_modality"]
SimilarityMap = Literal["clamp", "affine"]

SOURCE_KEYS = {
    "inputs": ("image_inputs", "text_inputs"),
    "teacher": ("teacher_image_features", "teacher_text_features"),
    "features": ("image_features", "text_features"),
}

__all__ = ["CalibratedUniformity", "calibration_weights"]


def _map(cos: Tensor, similarity_map: str) -> Tensor:
    return cos.clamp(0.0, 1.0) if similarity_map == "clamp" else 0.5 * (1.0 + cos)


def calibration_weights(
    a_rows: Tensor, a_cols: Tensor, t: float, similarity_map: SimilarityMap = "clamp", strength: float = 1.0
) -> Tensor:
    """log w_ij = β·2t·(1 − s_ij) for attribute rows (R, k) and columns (C, k); ``a_*`` may be a concatenation of
    several unit-normalised attributes scaled by 1/√m (then the cosine is the mean of the per-attribute cosines)."""
    cos = F.normalize(a_rows, dim=-1) @ F.normalize(a_cols, dim=-1).T
    return strength * 2.0 * t * (1.0 - _map(cos, similarity_map))


class CalibratedUniformity(nn.Module):
    """CM³'s calibrated uniformity on the image and text embeddings (see the module docstring for every option).

    Defaults: t = 2 (as plain uniformity), attributes = the frozen inputs, fused over both modalities, cosine
    clamped to [0, 1], β = 1, modality terms averaged, ``gather_local_loss`` (exact global value and gradient;
    the attributes are gathered with the embeddings, without gradient).
    """

    def __init__(
        self,
        t: float = 2.0,
        source: Source = "inputs",
        combine: Combine = "fused",
        similarity_map: SimilarityMap = "clamp",
        strength: float = 1.0,
        normalize: bool = True,
        modality_reduction: Literal["mean", "sum"] = "mean",
        cross_rank: CrossRank = "gather_local_loss",
    ) -> None:
        super().__init__()
        if t <= 0:
            raise ValueError(f"t must be > 0, got {t}")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        check_choice("source", source, tuple(SOURCE_KEYS))
        check_choice("combine", combine, ("fused", "per_modality"))
        check_choice("similarity_map", similarity_map, ("clamp", "affine"))
        check_choice("modality_reduction", modality_reduction, ("mean", "sum"))
        self.t = t
        self.source = source
        self.combine = combine
        self.similarity_map = similarity_map
        self.strength = strength
        self.normalize = normalize
        self.modality_reduction = modality_reduction
        self.cross_rank = cross_rank

    @property
    def requires_teacher(self) -> bool:
        return self.source == "teacher"

    def attributes(self, out: dict) -> tuple[Tensor, Tensor]:
        """The per-sample attributes that calibrate the image and the text term (detached, flattened)."""
        keys = SOURCE_KEYS[self.source]
        missing = [k for k in keys if k not in out]
        if missing:
            hint = {
                "inputs": "it exists on the STRUCTURE path; on the CLIP path use source=teacher or features",
                "teacher": "the module builds a teacher when a term needs one (module.teacher=auto)",
                "features": "",
            }[self.source]
            raise KeyError(f"CalibratedUniformity(source={self.source!r}) needs {missing}; {hint}")
        a_img, a_txt = (F.normalize(out[k].detach().flatten(1).float(), dim=-1) for k in keys)
        if self.combine == "per_modality":
            return a_img, a_txt
        # cos([a;b]/√2, [a';b']/√2) = ½(cos(a,a') + cos(b,b')) for unit a, b: one fused similarity per pair
        fused = torch.cat([a_img, a_txt], dim=-1) / 2**0.5
        return fused, fused

    def forward(self, out: dict) -> dict[str, Tensor]:
        a_img, a_txt = self.attributes(out)

        def weight(rows: Tensor, cols: Tensor) -> Tensor:
            return calibration_weights(rows, cols, self.t, self.similarity_map, self.strength)

        terms = []
        for key, attrs in (("image_features", a_img), ("text_features", a_txt)):
            z = maybe_normalize(out[key], self.normalize)
            terms.append(log_mean_pair_kernel(z, self.t, self.cross_rank, attrs, weight))
        loss = terms[0] + terms[1]
        if self.modality_reduction == "mean":
            loss = 0.5 * loss
        return {"loss": loss, "image": terms[0].detach(), "text": terms[1].detach()}
