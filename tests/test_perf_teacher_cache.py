"""The teacher-embedding cache changes nothing but speed: cached outputs equal the live teacher's, entries are
invalidated by any change of teacher, preprocessing, tokenizer, precision or data, and runs train identically."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_train, synthetic_shards
from hydra.utils import instantiate

from alignkit.callbacks.teacher_cache import TeacherCache, fingerprint_for
from alignkit.data import ImageTextDataModule
from alignkit.features.teacher_store import TeacherEmbeddingStore, dataset_identity, precompute
from alignkit.modules.clip_refine import AlignModule


def _module(encoder) -> AlignModule:
    cfg = compose_train(["+experiment=smoke"])
    return AlignModule(encoder=encoder, loss=instantiate(cfg.loss), optimizer=torch.optim.AdamW)


def _datamodule(encoder, **kw) -> ImageTextDataModule:
    dm = ImageTextDataModule(source="synthetic", num_samples=48, batch_size=16, num_workers=0, **kw)
    dm.attach(encoder.preprocess_train, encoder.preprocess_val, encoder.tokenizer)
    return dm


def _fingerprint(module, dm, precision="32-true") -> str:
    """The store fingerprint the callback computes under a trainer of ``precision`` (module on CPU)."""
    return fingerprint_for(SimpleNamespace(precision=precision), module, dm)


def _first_batch(dm) -> dict:
    return next(iter(dm.train_dataloader()))


def test_loss_with_cached_teacher_equals_loss_with_live_teacher(tiny_encoder):
    module, dm = _module(tiny_encoder), _datamodule(tiny_encoder)
    store = TeacherEmbeddingStore(_fingerprint(module, dm))
    done = precompute(store, module.teacher, dm, batch_size=7)  # other batch composition than training
    assert done == {"images": 48, "texts": len(store.texts)} and store.misses == 0
    batch = _first_batch(dm)
    images, tokens = batch["image"], batch["text"]
    out = module(images, tokens)
    live = module.teacher_forward(images, tokens)
    cached = store.outputs(module.teacher, images, tokens, batch["key"])
    assert store.misses == 0 and store.hits == 2 * len(batch["key"])
    assert set(cached) == set(live)
    for k in live:  # rows computed in other batches: equal up to fp32 rounding of another matmul blocking
        torch.testing.assert_close(cached[k], live[k], rtol=1e-5, atol=1e-5)
    step = {"step": 3}
    loss_live = module.loss({**out, **live, **step})
    loss_cached = module.loss({**out, **cached, **step})
    for k in ("loss", "loss_hycd", "loss_rafa"):
        torch.testing.assert_close(loss_cached[k], loss_live[k], rtol=1e-5, atol=1e-6)


def test_cached_rows_from_the_same_batch_are_bitwise_equal(tiny_encoder):
    module, dm = _module(tiny_encoder), _datamodule(tiny_encoder)
    store = TeacherEmbeddingStore(_fingerprint(module, dm))
    batch = _first_batch(dm)
    first = store.outputs(module.teacher, batch["image"], batch["text"], batch["key"])  # all misses: computed
    again = store.outputs(module.teacher, batch["image"], batch["text"], batch["key"])  # all hits
    live = module.teacher_forward(batch["image"], batch["text"])
    for k in live:
        assert torch.equal(first[k], live[k]) and torch.equal(again[k], live[k])


def test_misses_are_computed_live_for_the_missing_rows_only(tiny_encoder):
    module, dm = _module(tiny_encoder), _datamodule(tiny_encoder)
    store = TeacherEmbeddingStore(_fingerprint(module, dm))
    batch = _first_batch(dm)
    half = {k: v[:8] for k, v in batch.items()}
    store.outputs(module.teacher, half["image"], half["text"], half["key"])
    cached = store.outputs(module.teacher, batch["image"], batch["text"], batch["key"])
    live = module.teacher_forward(batch["image"], batch["text"])
    torch.testing.assert_close(
        cached["teacher_image_features"], live["teacher_image_features"], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        cached["teacher_text_features"], live["teacher_text_features"], rtol=1e-5, atol=1e-5
    )
    assert len(store.images) == 16


def test_fingerprint_changes_with_teacher_preprocess_data_and_precision(tiny_encoder, tmp_path):
    module, dm = _module(tiny_encoder), _datamodule(tiny_encoder)
    base = _fingerprint(module, dm)
    assert _fingerprint(module, dm) == base  # deterministic
    assert _fingerprint(module, dm, precision="bf16-mixed") != base
    assert _fingerprint(module, _datamodule(tiny_encoder, seed=1)) != base  # other synthetic data
    other_pre = _datamodule(tiny_encoder)
    other_pre.preprocess_val = tiny_encoder.preprocess_train
    assert _fingerprint(module, other_pre) != base
    with torch.no_grad():
        next(module.teacher.parameters()).add_(1e-3)
    assert _fingerprint(module, dm) != base
    module.teacher.to(torch.bfloat16)
    assert _fingerprint(module, dm) != base
    # shard files: rewriting a shard (other bytes / mtime) changes the identity
    synthetic_shards(tmp_path / "s", n=8, per_shard=8)
    wds = ImageTextDataModule(source="webdataset", train_shards=str(tmp_path / "s"), num_workers=0)
    before = dataset_identity(wds)
    synthetic_shards(tmp_path / "s", n=8, per_shard=8, seed=3)
    os.utime(tmp_path / "s" / "00000.tar", ns=(1, 1))
    assert dataset_identity(wds) != before


def test_store_persists_new_rows_and_ignores_broken_parts(tiny_encoder, tmp_path):
    module, dm = _module(tiny_encoder), _datamodule(tiny_encoder)
    fp = _fingerprint(module, dm)
    store = TeacherEmbeddingStore(fp, tmp_path)
    precompute(store, module.teacher, dm, batch_size=16)
    first = store.save()
    assert first is not None and store.save() is None  # nothing new
    (tmp_path / fp / "part-zzzz.pt").write_bytes(b"not a torch file")
    again = TeacherEmbeddingStore(fp, tmp_path)
    assert len(again.images) == 48 and len(again.texts) == len(store.texts)
    torch.testing.assert_close(again.images.data[:48], store.images.data[:48], rtol=0, atol=0)
    assert again.logit_scale == pytest.approx(store.logit_scale)
    assert len(TeacherEmbeddingStore("other", tmp_path).images) == 0


def test_callback_turns_itself_off_for_augmented_data(tiny_encoder):
    module = _module(tiny_encoder)

    class FakeTrainer:
        datamodule = _datamodule(tiny_encoder, augment=True)
        precision = "32-true"

    cb = TeacherCache(root=None)
    with pytest.warns(UserWarning, match="augment"):
        cb.on_fit_start(FakeTrainer(), module)
    assert cb.store is None
    FakeTrainer.datamodule = _datamodule(tiny_encoder)
    cb.on_fit_start(FakeTrainer(), module)
    assert cb.store is not None and cb.store.fingerprint == fingerprint_for(
        FakeTrainer(), module, FakeTrainer.datamodule
    )


def test_training_with_a_precomputed_cache_gives_the_same_model(tmp_path):
    from safetensors.torch import load_file

    from alignkit.run.train import train

    root = str(tmp_path / "cache")
    common = ["+experiment=smoke", "trainer.max_steps=3", "data.num_samples=96", "callbacks.checkpoint=null"]
    cached_cfg = compose_train(
        [*common, "callbacks=teacher_cache", f"callbacks.teacher_cache.root={root}"], tmp_path / "a"
    )
    import scripts.precompute_teacher as pt

    pt.run(cached_cfg)
    train(cached_cfg)
    parts = list((tmp_path / "cache").glob("*/part-*.pt"))
    assert len(parts) == 1  # every teacher row came from the precomputed part: training added none
    train(compose_train(common, tmp_path / "b"))
    a, b = (
        load_file(str(tmp_path / "a" / "open_clip" / "open_clip_model.safetensors")),
        load_file(str(tmp_path / "b" / "open_clip" / "open_clip_model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias has an exactly zero true gradient (softmax is shift-invariant), so Adam turns fp32
            # rounding noise into +-lr steps there: compare the query and value biases only.
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        # Cached rows came from other batch compositions (fp32 rounding ~1e-6); Adam at lr 1e-3 for 3 steps.
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=k)
