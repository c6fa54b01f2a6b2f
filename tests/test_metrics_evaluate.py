"""encode_eval_set_shard + gather_shards / evaluate_embeddings / evaluate_sets with a tiny open_clip model; sharding simulated as world_size=2."""

import io
import re

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from alignkit.data.evalsets import ClassificationSet, ImageList, RetrievalSet
from alignkit.encoders.openclip import register_shipped_configs
from alignkit.eval.encode import (
    encode_eval_set_shard,
    evaluate_embeddings,
    evaluate_sets,
    gather_shards,
    merge_shards,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    register_shipped_configs()  # the 3.4M-parameter CLIP shipped in alignkit/model_configs
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("alignkit-tiny-vit")
    return model, open_clip.get_tokenizer("alignkit-tiny-vit"), preprocess


def _images(n: int, seed: int = 0) -> ImageList:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return ImageList(out)


@pytest.fixture(scope="module")
def cls_set():
    return ClassificationSet(
        "toy", _images(7), [0, 1, 2, 0, 1, 2, 0], ["cat", "dog", "bird"], ["a photo of a {c}.", "a {c}."]
    )


@pytest.fixture(scope="module")
def ret_set():
    caps = [["a red square", "red"], ["blue sky"], ["green", "grass", "a lawn"], ["night"], ["sun"]]
    return RetrievalSet("toyret", _images(5, seed=1), caps)


def test_classification_embeddings_match_direct_encoding(tiny, cls_set):
    model, tok, pre = tiny
    model.train()
    enc = gather_shards(encode_eval_set_shard(model, tok, pre, cls_set, batch_size=3))
    assert model.training  # mode restored
    assert enc.image.shape == (7, 64) and enc.text.shape == (3, 2, 64)
    model.eval()
    with torch.no_grad():
        direct_img = model.encode_image(torch.stack([pre(im) for im in cls_set.images]))
        direct_txt = model.encode_text(tok(["a photo of a dog.", "a dog."]))
    torch.testing.assert_close(enc.image, direct_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.text[1], direct_txt, atol=1e-5, rtol=1e-5)
    assert enc.targets.tolist() == cls_set.labels


@pytest.mark.parametrize("world_size", [2, 9])
def test_sharded_encoding_equals_unsharded(tiny, cls_set, ret_set, world_size):
    # world_size=9 leaves some ranks with no images at all (7 or 5 images).
    model, tok, pre = tiny
    for evalset in (cls_set, ret_set):
        full = gather_shards(encode_eval_set_shard(model, tok, pre, evalset, batch_size=4))
        shards = [
            encode_eval_set_shard(model, tok, pre, evalset, 2, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        assert sum(len(s.image_index) for s in shards) == len(evalset.images)
        merged = merge_shards(shards[::-1])  # gather order must not matter
        torch.testing.assert_close(merged.image, full.image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.text, full.text, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.targets, full.targets)
        with pytest.raises(RuntimeError, match="do not cover"):
            merge_shards(shards[:-1] if len(shards[-1].image_index) else shards[:1])


def test_retrieval_text_to_image_and_metric_keys(tiny, ret_set):
    model, tok, pre = tiny
    enc = gather_shards(encode_eval_set_shard(model, tok, pre, ret_set))
    assert enc.targets.tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
    m = evaluate_embeddings(enc)
    assert {k for k in m if k.startswith("ret/")} == {
        f"ret/toyret/{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)
    }
    assert "gap/toyret/l2" in m and "gap/toyret/uniformity_all" in m
    assert m["ret/toyret/t2i_r@5"] == 1.0  # 5 gallery images: k=5 covers all
    assert all(isinstance(v, float) for v in m.values())


def test_evaluate_sets_sorted_keys(tiny, cls_set, ret_set):
    model, tok, pre = tiny
    m, kept = evaluate_sets(model, tok, pre, {"a": cls_set, "b": ret_set}, keep=["b"])
    assert list(kept) == ["b"] and kept["b"].image.shape == (5, 64)
    assert list(m) == sorted(m)
    assert {"zs/a/top1", "zs/a/top5", "zs/a/mean_per_class_recall"} <= set(m)
    assert m["zs/a/top5"] == 1.0  # 3 classes: k clipped to 3


def test_progress_bar_on_rank_zero_only(tiny, cls_set, capsys):
    model, tok, pre = tiny
    encode_eval_set_shard(model, tok, pre, cls_set, batch_size=4, rank=1, world_size=2)
    assert "eval toy" not in capsys.readouterr().err  # other ranks stay quiet
    encode_eval_set_shard(model, tok, pre, cls_set, batch_size=4, rank=0, world_size=2)
    err = capsys.readouterr().err
    # rank 0's slice: images 0, 2, 4, 6 and 3 of the 6 class prompts (0, 2, 4): a bar over 7 items (tqdm
    # redraws at most every 0.1 s and clears the bar at the end, so only its first draw is sure to be seen)
    assert "eval toy" in err and re.search(r"\b\d/7 \[", err), err
