"""Zero-shot metrics: a case worked by hand, and agreement with CLIP_benchmark (or a plain loop)."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.metrics import zeroshot_classifier, zeroshot_logits, zeroshot_metrics

# Hand case, d = 2, C = 3 classes, T = 2 templates.
#   class 0 prompts (2,0), (0,2) -> unit (1,0), (0,1) -> mean (.5,.5) -> re-normalised (1,1)/√2
#   class 1 prompts (1,0), (3,0) -> (1,0)
#   class 2 prompts (0,-1), (0,-3) -> (0,-1)
TEXT = torch.tensor([[[2.0, 0], [0, 2]], [[1, 0], [3, 0]], [[0, -1], [0, -3]]])
S = 1 / math.sqrt(2)
# Images and their cosines to classes (0, 1, 2):
#   a = (0,1):   ( .7071,  0,     -1    ) -> ranking 0,1,2   label 0: top-1 hit
#   b = (1,0):   ( .7071,  1,      0    ) -> ranking 1,0,2   label 0: top-2 hit
#   c = (1,-2):  (-.3162,  .4472,  .8944) -> ranking 2,1,0   label 1: top-2 hit
#   d = (.1,1):  ( .7740,  .0995, -.9950) -> ranking 0,1,2   label 2: top-3 hit
IMAGES = torch.tensor([[0.0, 1], [1, 0], [1, -2], [0.1, 1]])
LABELS = torch.tensor([0, 0, 1, 2])


def test_classifier_ensemble_by_hand():
    w = zeroshot_classifier(TEXT)
    torch.testing.assert_close(w, torch.tensor([[S, S], [1, 0], [0, -1]]))
    # A single template (C, d) is accepted and only normalised.
    torch.testing.assert_close(zeroshot_classifier(TEXT[:, 1]), torch.tensor([[0.0, 1], [1, 0], [0, -1]]))


def test_logits_are_100_cos():
    logits = zeroshot_logits(IMAGES, zeroshot_classifier(TEXT))
    torch.testing.assert_close(logits[0], torch.tensor([100 * S, 0.0, -100.0]))
    torch.testing.assert_close(logits[2], torch.tensor([-31.62278, 44.72136, 89.44272]))


def test_metrics_by_hand():
    m = zeroshot_metrics(zeroshot_logits(IMAGES, zeroshot_classifier(TEXT)), LABELS, topk=(1, 2, 5))
    assert m["top1"] == pytest.approx(1 / 4)  # only a
    assert m["top2"] == pytest.approx(3 / 4)  # a, b, c
    assert m["top5"] == pytest.approx(1.0)  # k clipped to 3 classes: every label is somewhere
    # per-class recall: class 0 {a hit, b miss} = 1/2, class 1 {c miss} = 0, class 2 {d miss} = 0 -> 1/6
    assert m["mean_per_class_recall"] == pytest.approx(1 / 6)


def test_mean_per_class_recall_ignores_absent_classes():
    logits = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    # classes 2 and 3 have no samples; class 0: 2/2, class 1: 1/1 -> 1.0 (not 2/4)
    assert zeroshot_metrics(logits, torch.tensor([0, 0, 1]))["mean_per_class_recall"] == 1.0


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


def _reference_cb(text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark's classifier builder + sklearn's balanced accuracy (``make setup`` installs clip-benchmark)."""
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score

    c, t, _ = text.shape
    classnames = [f"class{i}" for i in range(c)]
    templates = [f"t{j} {{c}}" for j in range(t)]
    prompts = {
        tpl.format(c=name): text[i, j] for i, name in enumerate(classnames) for j, tpl in enumerate(templates)
    }

    class FakeModel:
        def encode_text(self, ids):
            return torch.stack([table[int(k)] for k in ids])

    keys = list(prompts)
    table = [prompts[k] for k in keys]
    tokenizer = lambda texts: torch.tensor([keys.index(s) for s in texts])  # noqa: E731
    w = cb.zero_shot_classifier(FakeModel(), tokenizer, classnames, templates, "cpu", amp=False)  # (d, C)
    logits = 100.0 * F.normalize(images, dim=-1) @ w
    # cb.accuracy itself is not used: it calls float() on a 1-element numpy array, which recent numpy (2.4 here)
    # rejects ("only 0-dimensional arrays can be converted"). Its definition, written out:
    top = logits.topk(5, dim=1).indices
    acc1 = (top[:, 0] == labels).float().mean().item()
    acc5 = (top == labels[:, None]).any(1).float().mean().item()
    mpcr = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    return {"top1": acc1, "top5": acc5, "mean_per_class_recall": mpcr}


def _reference_loop(text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Plain Python loops over classes, templates and samples."""
    c, t, _ = text.shape
    w = []
    for i in range(c):
        acc = [0.0] * text.shape[2]
        for j in range(t):
            v = text[i, j] / text[i, j].norm()
            acc = [a + float(x) / t for a, x in zip(acc, v)]
        n = math.sqrt(sum(a * a for a in acc))
        w.append([a / n for a in acc])
    top1 = top5 = 0
    hits, counts = [0] * c, [0] * c
    for x, y in zip(images, labels.tolist()):
        x = x / x.norm()
        scores = [sum(float(a) * b for a, b in zip(x, wi)) for wi in w]
        order = sorted(range(c), key=lambda k: -scores[k])
        top1 += order[0] == y
        top5 += y in order[:5]
        counts[y] += 1
        hits[y] += order[0] == y
    n = len(labels)
    recalls = [h / k for h, k in zip(hits, counts) if k]
    return {"top1": top1 / n, "top5": top5 / n, "mean_per_class_recall": sum(recalls) / len(recalls)}


def test_agrees_with_reference_implementation():
    g = torch.Generator().manual_seed(0)
    c, t, d, n = 10, 3, 16, 300
    text = torch.randn(c, t, d, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    # images near their class direction plus noise, so accuracies are neither 0 nor 1
    images = text.mean(1)[labels] + 1.5 * torch.randn(n, d, generator=g)
    ours = zeroshot_metrics(zeroshot_logits(images, zeroshot_classifier(text)), labels)
    assert 0.1 < ours["top1"] < 0.95 and ours["top5"] < 1.0
    refs = [_reference_loop(text, images, labels), _reference_cb(text, images, labels)]
    for ref in refs:  # a plain loop and CLIP_benchmark's own functions
        for k in ("top1", "top5", "mean_per_class_recall"):
            assert ours[k] == pytest.approx(ref[k], abs=1e-6), k
