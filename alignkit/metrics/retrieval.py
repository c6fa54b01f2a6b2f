"""Image-text retrieval recall@k with several captions per image (CLIP_benchmark hit-rate semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["retrieval_metrics"]


def retrieval_metrics(
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k in both directions; embeddings are L2-normalised here (cosine scores).

    ``image_embeddings`` ``(N_img, d)`` holds each gallery image once; ``text_embeddings`` ``(N_txt, d)``
    holds every caption; ``text_to_image[j]`` is the index of caption j's image.

    * ``t2i_r@k``: fraction of captions whose image is among the caption's k best images.
    * ``i2t_r@k``: fraction of images with at least one of their captions among the image's k best captions.

    k is clipped to the gallery size. The score matrix is computed ``chunk_size`` query rows at a time,
    so memory is ``O(chunk_size · max(N_img, N_txt))``, never ``N_img × N_txt``.
    """
    img = F.normalize(image_embeddings.float(), dim=-1)
    txt = F.normalize(text_embeddings.float(), dim=-1)
    t2i = text_to_image.long().to(img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got {tuple(t2i.shape)}")
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img})")
    if torch.bincount(t2i, minlength=n_img).min() == 0:
        # An image without captions can never be hit in i2t; CLIP_benchmark would divide by zero there.
        raise ValueError("every gallery image needs at least one caption (text_to_image misses some images)")

    out: dict[str, float] = {}
    # text -> image: one positive per caption.
    kmax = min(max(ks), n_img)
    t2i_hits = torch.zeros(n_txt, kmax, dtype=torch.bool, device=img.device)
    for start in range(0, n_txt, chunk_size):
        top = (txt[start : start + chunk_size] @ img.T).topk(kmax, dim=1).indices
        t2i_hits[start : start + chunk_size] = top == t2i[start : start + chunk_size, None]
    for k in ks:
        out[f"t2i_r@{k}"] = t2i_hits[:, : min(k, n_img)].any(dim=1).float().mean().item()

    # image -> text: positives are all of the image's captions; a hit needs any one in the top k.
    kmax = min(max(ks), n_txt)
    i2t_hits = torch.zeros(n_img, kmax, dtype=torch.bool, device=img.device)
    for start in range(0, n_img, chunk_size):
        top = (img[start : start + chunk_size] @ txt.T).topk(kmax, dim=1).indices
        rows = torch.arange(start, min(start + chunk_size, n_img), device=img.device)
        i2t_hits[start : start + chunk_size] = t2i[top] == rows[:, None]
    for k in ks:
        out[f"i2t_r@{k}"] = i2t_hits[:, : min(k, n_txt)].any(dim=1).float().mean().item()
    return out
