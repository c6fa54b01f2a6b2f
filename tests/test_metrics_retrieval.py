"""Retrieval recall@k: a multi-caption case by hand, the naive 1:1 pitfall, and reference agreement."""

import pytest
import torch

from alignkit.metrics import retrieval_metrics

# Two images, three captions: image 0 has captions 0 and 1, image 1 has caption 2.
IMAGES = torch.tensor([[1.0, 0], [0, 1]])
TEXTS = torch.tensor([[0.2, 1], [1, 0.1], [0.1, 1]])
T2I = torch.tensor([0, 0, 1])
# Cosines (caption × image), captions normalised: c0 = (.196, .981), c1 = (.995, .0995), c2 = (.0995, .995)
#            image0  image1
#   c0       .196    .981    -> best image 1, but its image is 0: t2i miss at 1, hit at 2
#   c1       .995    .0995   -> image 0: hit
#   c2       .0995   .995    -> image 1: hit
# t2i R@1 = 2/3; R@2 (= R@5, R@10 clipped to 2 images) = 1.
# i2t: image 0 ranks c1 (.995) > c0 (.196) > c2 -> c1 is its caption: hit at 1
#      image 1 ranks c2 (.995) > c0 (.981) > c1 -> hit at 1       => i2t R@1 = 1.


def test_multi_caption_by_hand():
    m = retrieval_metrics(IMAGES, TEXTS, T2I, ks=(1, 2, 5, 10))
    assert m["t2i_r@1"] == pytest.approx(2 / 3)
    assert m["t2i_r@2"] == m["t2i_r@5"] == m["t2i_r@10"] == 1.0
    assert m["i2t_r@1"] == 1.0


def test_naive_one_to_one_differs():
    # A naive implementation pairs image i with one caption only (here its first caption: image 0 <-> c0,
    # image 1 <-> c2) and calls i2t a hit when that caption ranks first. Image 0 ranks c1 first, so the
    # naive i2t R@1 = 1/2, while the correct value (any of the image's captions) is 1.
    scores = torch.nn.functional.normalize(IMAGES, dim=-1) @ torch.nn.functional.normalize(TEXTS, dim=-1).T
    first_caption = torch.tensor([0, 2])
    naive_i2t_r1 = (scores.argmax(1) == first_caption).float().mean().item()
    assert naive_i2t_r1 == 0.5
    assert retrieval_metrics(IMAGES, TEXTS, T2I, ks=(1,))["i2t_r@1"] == 1.0


def test_chunking_does_not_change_results():
    img, txt, t2i = _random_case(seed=1)
    full = retrieval_metrics(img, txt, t2i, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert retrieval_metrics(img, txt, t2i, chunk_size=chunk) == full


def test_chunking_bounds_the_score_matrix(monkeypatch):
    # Record the largest (rows × cols) product formed by Tensor.__matmul__ inside retrieval_metrics.
    img, txt, t2i = _random_case(seed=2)
    sizes = []
    orig = torch.Tensor.__matmul__

    def spy(a, b):
        out = orig(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    retrieval_metrics(img, txt, t2i, chunk_size=8)
    assert sizes and max(sizes) <= 8 * max(len(img), len(txt)) < len(img) * len(txt)


def test_bad_inputs():
    with pytest.raises(ValueError, match="text_to_image must have shape"):
        retrieval_metrics(IMAGES, TEXTS, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.randn(3, 2), TEXTS, T2I)  # image 2 has no caption


def _random_case(seed: int, n_img: int = 40, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, d, generator=g)
    counts = torch.randint(1, 6, (n_img,), generator=g)  # 1..5 captions per image
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]  # captions not grouped by image
    txt = img[t2i] + 1.2 * torch.randn(len(t2i), d, generator=g)
    return img, txt, t2i


def _reference_loop(img, txt, t2i, ks):
    """Brute force: for every query sort all candidates by cosine and look at the first k."""

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    out = {}
    owners = t2i.tolist()
    for k in ks:
        hits = 0
        for j in range(len(txt)):
            ranked = sorted(range(len(img)), key=lambda i: -cos(txt[j], img[i]))
            hits += owners[j] in ranked[:k]
        out[f"t2i_r@{k}"] = hits / len(txt)
        hits = 0
        for i in range(len(img)):
            ranked = sorted(range(len(txt)), key=lambda j: -cos(img[i], txt[j]))
            hits += any(owners[j] == i for j in ranked[:k])
        out[f"i2t_r@{k}"] = hits / len(img)
    return out


def _reference_cb(img, txt, t2i, ks):
    """CLIP_benchmark's recall_at_k + batchify on the same embeddings (``make setup`` installs clip-benchmark)."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    img_n = torch.nn.functional.normalize(img, dim=-1)
    txt_n = torch.nn.functional.normalize(txt, dim=-1)
    scores = txt_n @ img_n.T  # (texts, images), as CLIP_benchmark builds it
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(txt)), t2i] = True
    out = {}
    for k in ks:
        out[f"t2i_r@{k}"] = (
            (batchify(recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        )
        out[f"i2t_r@{k}"] = (
            (batchify(recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        )
    return out


def test_agrees_with_reference_implementations():
    img, txt, t2i = _random_case(seed=0)
    ks = (1, 5, 10)
    ours = retrieval_metrics(img, txt, t2i, ks=ks, chunk_size=16)
    assert 0.05 < ours["t2i_r@1"] < 0.95 and 0.05 < ours["i2t_r@1"] < 0.95  # not a degenerate case
    for ref in [_reference_loop(img, txt, t2i, ks), _reference_cb(img, txt, t2i, ks)]:
        assert ours == pytest.approx(ref, abs=1e-6)  # float32 means vs Python floats
