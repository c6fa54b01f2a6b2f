"""Frozen-encoder alignment through train(): tiny towers, cached and online features, resume, exports, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_VISION, compose_train, load_in_fresh_process, synthetic_shards
from omegaconf import open_dict
from run_helpers import signal_at_step

from alignkit.run.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    synthetic_shards(out, n=96, per_shard=48)
    return str(out)


def tiny_cfg(tmp_path, shards, text_dir, *extra, run=None):
    cfg = compose_train(
        [
            "+experiment=structure",
            "encoder=frozen_towers",
            f"data.train_shards={shards}",
            f"paths.cache_dir={tmp_path}/cache",
            "data.batch_size=16",
            "data.encode_batch_size=32",
            "data.selection.n_samples=64",
            "data.selection.k=5",
            "module.image_head.out_dim=16",
            "module.text_head.out_dim=16",
            "loss.align.warmup_steps=4",
            "epochs=2",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.every_n_train_steps=3",
            *extra,
        ],
        run or tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.encoder.vision = dict(TINY_VISION)
        cfg.encoder.text = {"kind": "hf", "path": text_dir}
        cfg.encoder.context_length = 16
    return cfg


def _head_keys(ckpt_path):
    return sorted(torch.load(ckpt_path, weights_only=False)["state_dict"])


def test_tiny_end_to_end_cached(tmp_path, shards, tiny_text_dir):
    from alignkit.encoders.aligned import load_aligned

    summary = train(tiny_cfg(tmp_path, shards, tiny_text_dir))
    run = tmp_path / "run"
    assert summary["global_step"] == 12  # 96 pairs / 16 = 6 steps x 2 epochs
    sel = json.loads((run / "selection.json").read_text())
    assert sel["pairs"] == 96 and sel["images"] == 96 and (run / "layer_scores.csv").is_file()
    # "a <colour> <shape>" captions repeat: the scored sample keeps each caption (and image) once
    assert sel["selection"]["dedup"] == "both" and sel["rows"] == sel["unique_captions"] == sel["captions"]
    assert sel["uncertainty"]["n_boot"] == 1000 and len(sel["uncertainty"]["difference_ci"]) == 2
    keys = _head_keys(run / "checkpoints" / "last.ckpt")
    assert keys and all(
        k.startswith(("model.image_head.", "model.text_head.", "model.logit_scale")) for k in keys
    )
    assert "open_clip" not in summary["exported"]  # selected layers are not both final (or not linear-only)
    # The export reloads (towers from their specs) and encodes like the trained module.
    model, tok, pre = load_aligned(run / "model")
    from PIL import Image

    img = pre(Image.new("RGB", (40, 40), (200, 30, 30))).unsqueeze(0)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    heads = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    torch.testing.assert_close(model.image_head.proj.weight, heads["image_head.proj.weight"])
    with torch.no_grad():
        z = model.encode_image(img)
        t = model.encode_text(tok(["a red circle"]))
    assert z.shape == (1, 16) and t.shape == (1, 16)


def test_eval_interface_is_tap_then_head(tmp_path, shards, tiny_text_dir):
    from alignkit.run.build import build_run

    cfg = tiny_cfg(
        tmp_path,
        shards,
        tiny_text_dir,
        "data.selection.mode=fixed",
        "data.image_layer=1",
        "data.text_layer=-2",
    )
    run = build_run(cfg, callbacks=False, loggers=False)  # features prepared into the run directory
    dm, enc, module = run.data, run.encoder, run.module
    assert (run.found["image_layer"], run.found["text_layer"]) == (1, 1)
    model, tokenizer, preprocess = module.eval_interface()
    from PIL import Image

    images = torch.stack([preprocess(Image.new("RGB", (32, 32), c)) for c in [(255, 0, 0), (0, 0, 255)]])
    tokens = tokenizer(["a red square", "a blue triangle on the left"])
    with torch.no_grad():
        vit = enc.vision.model
        x = vit.forward_intermediates(
            images, indices=[1], return_prefix_tokens=True, norm=False, intermediates_only=True
        )
        by_hand_img = module.model.image_head(x[0][1][:, 0])  # class token after block 1, before the norm
        bert = enc.text.model
        mask = (tokens != enc.tokenizer.pad_id).long()
        hidden = bert(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        by_hand_txt = module.model.text_head(pooled)
        torch.testing.assert_close(model.encode_image(images), by_hand_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), by_hand_txt, atol=1e-5, rtol=1e-5)
    # The cached training features are the same taps.
    x_img, x_txt = dm.paired_features()
    assert x_img.shape[1] == by_hand_img.new_empty(0, enc.vision.model.embed_dim).shape[1]
    assert x_txt.shape[1] == 32


def _recorded(run, *extra):
    """Overrides that record every trained batch's pair rows into ``run`` (run_helpers.RecordKeys)."""
    return ["+callbacks.keys._target_=run_helpers.RecordKeys", f"+callbacks.keys.dirpath={run}", *extra]


def _rows(run) -> list[list[int]]:
    return [json.loads(x)["keys"] for x in (run / "keys_rank0.jsonl").read_text().splitlines()]


def _heads(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


# The cosine period pinned to the full 12 steps: a run stopped by trainer.max_steps=5 then resumed to the end
# follows the same learning rates as the uninterrupted run (by default the period is the run's own max_steps).
RESUME = (
    "data.selection.mode=last",
    "export=false",
    "trainer.deterministic=true",
    "scheduler.total_steps=12",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, tiny_text_dir):
    """A 12-step run (2 epochs of 6) that nobody stops: the reference of the resume tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = tmp / "run"
    assert train(tiny_cfg(tmp, shards, tiny_text_dir, *_recorded(run, *RESUME), run=run))["global_step"] == 12
    return run


def _assert_same_as_uninterrupted(run, ref) -> None:
    rows = _rows(run)
    assert rows == _rows(ref), "the resumed run trained on other batches than the uninterrupted one"
    for epoch in range(2):  # floor rounding, 96 pairs / 16: each pair exactly once per epoch
        seen = sorted(r for b in rows[epoch * 6 : (epoch + 1) * 6] for r in b)
        assert seen == list(range(96))
    a, b = _heads(ref), _heads(run)
    assert sorted(a) == sorted(b) and any("head" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: resumed heads differ from the uninterrupted run"


def test_resume_restores_heads_and_step(tmp_path, shards, tiny_text_dir, uninterrupted):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    first = train(tiny_cfg(tmp_path, shards, tiny_text_dir, *_recorded(run, *RESUME, "trainer.max_steps=5")))
    assert first["global_step"] == 5  # stopped mid-epoch 1 (6 steps per epoch)
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 5 and not any(".towers." in k for k in ckpt["state_dict"])
    assert ckpt["alignkit"]["workflow"] == "structure" and ckpt["alignkit"]["teacher"] is False
    assert ckpt["alignkit"]["model"]["towers"]["vision"]["model"] == "test_vit"
    trained = ckpt["state_dict"]
    # Resuming with nothing left to do re-saves what it restored: the trained heads, not a fresh (seeded) init,
    # and the data position (5 batches into epoch 0), not the start of the epoch.
    again = train(tiny_cfg(tmp_path, shards, tiny_text_dir, *_recorded(run, *RESUME, "trainer.max_steps=5")))
    assert again["resumed_from"].endswith("last.ckpt") and again["global_step"] == 5
    restored = torch.load(last, weights_only=False)
    assert sorted(restored["state_dict"]) == sorted(trained) and any("head" in k for k in trained)
    for k, v in trained.items():
        torch.testing.assert_close(restored["state_dict"][k], v, rtol=0, atol=0, msg=k)
    position = restored["FeaturePairDataModule"]["train_loader"]
    assert (position["epoch"], position["batches"]) == (0, 5)
    second = train(tiny_cfg(tmp_path, shards, tiny_text_dir, *_recorded(run, *RESUME)))
    assert second["resumed_from"].endswith("last.ckpt") and second["global_step"] == 12
    _assert_same_as_uninterrupted(run, uninterrupted)


@pytest.mark.slow
def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path, shards, tiny_text_dir, uninterrupted):
    run = tmp_path / "run"
    signal_at = signal_at_step(8, tmp_path / "signalled")  # mid-epoch 2 (steps 6..11)
    first = train(tiny_cfg(tmp_path, shards, tiny_text_dir, *_recorded(run, *RESUME, *signal_at)))
    assert first["preempted"] and first["global_step"] == 9  # the signalled batch finishes, then it stops
    second = train(tiny_cfg(tmp_path, shards, tiny_text_dir, *_recorded(run, *RESUME, *signal_at)))
    assert second["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and second["global_step"] == 12
    _assert_same_as_uninterrupted(run, uninterrupted)


def test_online_path_is_its_own_data_config(tmp_path, shards, tiny_text_dir):
    from hydra.utils import instantiate

    # the old switch on the cached node names the new config instead of silently caching (Hydra wraps the error)
    with pytest.raises(
        Exception, match=r"data\.features='online'.*use the online data config: data=features_online"
    ):
        instantiate(tiny_cfg(tmp_path, shards, tiny_text_dir, "data.features=online").data)


def test_online_path_runs_towers_in_the_loop(tmp_path, shards, tiny_text_dir):
    cfg = tiny_cfg(
        tmp_path, shards, tiny_text_dir, "data=features_online", "data.selection.mode=last", "trainer.max_steps=3",
        "export=false",
    )  # fmt: skip
    summary = train(cfg)
    assert summary["global_step"] == 3 and summary["metrics"]["train/loss"] > 0
    assert not list((tmp_path / "cache").rglob("layer_*.npy"))  # nothing cached with fixed/last layers online


def test_online_selection_scores_only_the_first_n_samples(tmp_path, shards, tiny_text_dir):
    cfg = tiny_cfg(
        tmp_path, shards, tiny_text_dir, "data=features_online", "trainer.max_steps=2", "export=false"
    )
    assert train(cfg)["global_step"] == 2
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert sel["features"] == "online" and sel["pairs"] == 64 < 96  # data.selection.n_samples of the 96 pairs
    assert (tmp_path / "run" / "layer_scores.csv").is_file() and list(
        (tmp_path / "cache").rglob("layer_*.npy")
    )


@pytest.mark.slow
def test_open_clip_export_loads_and_encodes_the_same(tmp_path, shards, tiny_text_dir, monkeypatch):

    from alignkit.encoders.aligned import load_aligned

    # the export makes the tower's hub id resolvable in this (temporary) Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = tiny_cfg(
        tmp_path,
        shards,
        tiny_text_dir,
        "epochs=1",
        "data.selection.mode=last",
        "+module.text_head.bias=false",
    )
    summary = train(cfg)
    assert summary["exported"]["open_clip"] == str(tmp_path / "run" / "open_clip")
    ours, tok, _ = load_aligned(tmp_path / "run" / "model")
    card = (tmp_path / "run" / "open_clip" / "README.md").read_text()
    assert "STRUCTURE" in card and "val/" not in card  # no evaluation sets in this run: no metrics table
    res = load_in_fresh_process(
        tmp_path / "run" / "open_clip", tmp_path, {"HF_HUB_CACHE": str(tmp_path / "hf")}
    )
    with torch.no_grad():
        torch.testing.assert_close(res["image"], ours.encode_image(res["images"]), atol=1e-5, rtol=1e-4)
        ours_text = ours.encode_text(tok(["a red square", "a dog on grass", "x"]))
        torch.testing.assert_close(res["text"], ours_text, atol=1e-5, rtol=1e-4)


def test_cca_heads_equal_the_analytic_projection(tmp_path, shards, tiny_text_dir):
    from hydra.utils import instantiate

    from alignkit.features.csa import CCAAligner

    cfg = tiny_cfg(tmp_path, shards, tiny_text_dir, "epochs=0", "module.head_init=cca")
    summary = train(cfg)
    assert summary["global_step"] == 0
    # Rebuild the same data and compare the module's heads with a direct CCA fit.
    dm, enc = instantiate(cfg.data), instantiate(cfg.encoder)
    dm.prepare_features(enc)
    x, y = dm.paired_features()
    cca = CCAAligner(dim=16).fit(x, y)
    from alignkit.encoders.aligned import load_aligned

    model, _, _ = load_aligned(tmp_path / "run" / "model", towers=enc)
    k = cca.proj_x.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model.image_head(x)[:, :k], cca.encode_image(x), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(model.text_head(y)[:, :k], cca.encode_text(y), atol=1e-3, rtol=1e-3)


def test_unwritable_cache_dir_fails_before_encoding(tmp_path, shards, tiny_text_dir, monkeypatch):
    from alignkit.encoders import frozen_towers as towers
    from alignkit.run.preflight import ConfigError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(towers.FrozenTowers, "__init__", lambda *a, **k: pytest.fail("encoder built"))
    cfg = tiny_cfg(tmp_path, shards, tiny_text_dir, f"paths.cache_dir={blocker}/sub")
    # The start-up probe of every directory the run writes catches it before any data or model is built.
    with pytest.raises(ConfigError, match=r"not writable.*data\.cache_dir"):
        train(cfg)


def test_layer_out_of_range_lists_valid_layers(tmp_path, shards, tiny_text_dir):
    cfg = tiny_cfg(
        tmp_path,
        shards,
        tiny_text_dir,
        "data.selection.mode=fixed",
        "data.image_layer=99",
        "data.text_layer=0",
    )
    with pytest.raises(IndexError, match=r"layer 99 is out of range .* valid layers: 0=blocks.0, .*=head"):
        train(cfg)


def test_paper_recipe_without_weights_stops_with_instructions(tmp_path, shards):
    cfg = compose_train(
        ["+experiment=structure", f"data.train_shards={shards}", f"paths.cache_dir={tmp_path}"], tmp_path
    )
    assert (cfg.data.batch_size, cfg.optimizer.betas, cfg.optimizer.weight_decay) == (4096, [0.9, 0.95], 1e-4)
    assert (cfg.loss.align.temperature, cfg.loss.align.lambda_structure, cfg.loss.align.warmup_steps) == (
        0.05,
        10.0,
        1000,
    )
    assert cfg.data.selection.k == "rice" and cfg.data.selection.n_samples == 5000
    with pytest.raises(Exception, match=r"encoder.vision.checkpoint_path="):  # Hydra wraps the RuntimeError
        train(cfg)


def test_each_unique_item_encoded_once_and_all_layer_entry_reused(
    tmp_path, shards, tiny_text_dir, monkeypatch
):
    from hydra.utils import instantiate

    cfg = tiny_cfg(tmp_path, shards, tiny_text_dir)
    enc = instantiate(cfg.encoder)
    seen = {"images": 0}
    orig = enc.image_layers

    def counting(images, layers):
        seen["images"] += images.shape[0]
        return orig(images, layers)

    monkeypatch.setattr(enc, "image_layers", counting)
    instantiate(cfg.data).prepare_features(enc)  # selection: every layer cached
    assert seen["images"] == 96
    entries = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    last = tiny_cfg(tmp_path, shards, tiny_text_dir, "data.selection.mode=last")
    found = instantiate(last.data).prepare_features(enc)  # served by the all-layer entries, nothing encoded
    assert (
        seen["images"] == 96
        and sorted(p.name for p in (tmp_path / "cache" / "features").iterdir()) == entries
    )
    assert found["image_layer"] == enc.vision.num_layers - 1


def test_eval_py_rebuilds_the_run_from_its_checkpoint_and_from_its_export(tmp_path, shards, tiny_text_dir):
    # eval.py on a frozen-encoder run: towers rebuilt from the recorded specs, heads from the checkpoint (or from
    # the exported model/ directory); the numbers equal the training callback's evaluation of the live module.
    from alignkit.run.evaluate import evaluate

    summary = train(tiny_cfg(tmp_path, shards, tiny_text_dir, "evalsets=synthetic"))
    run = tmp_path / "run"
    final = json.loads((run / "metrics.json").read_text())[str(summary["global_step"])]
    assert any(k.startswith("val/zs/") for k in final) and any(k.startswith("val/ret/") for k in final)
    for src in (run, run / "model"):
        out = tmp_path / f"eval_{src.name}"
        result = evaluate(compose_train([f"model.ckpt={src}", "evalsets=synthetic"], out, config_name="eval"))
        assert set(result["metrics"]) == set(final)
        for k, v in final.items():
            assert result["metrics"][k] == pytest.approx(v, abs=1e-5), (src, k)
    assert result["step"] == 0 and "frozen towers + heads" in (out / "report.md").read_text()


def test_warmup_fraction_is_a_share_of_the_planned_run(tmp_path, shards, tiny_text_dir):
    import csv

    cfg = tiny_cfg(
        tmp_path, shards, tiny_text_dir, "loss.align.warmup_fraction=0.5", "loss.align.warmup_steps=0"
    )
    summary = train(cfg)
    assert summary["global_step"] == 12
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    lam = {
        int(r["step"]): float(r["train/align_lambda_structure"])
        for r in rows
        if r.get("train/align_lambda_structure")
    }
    # 12 planned steps x 0.5 = a 6-step warm-up: λ_t = 10 · min(1, t / 6) at the step the loss saw
    assert lam and all(v == pytest.approx(10.0 * min(1.0, s / 6)) for s, v in lam.items()), lam
    assert max(lam.values()) == pytest.approx(10.0) and min(lam.values()) < 10.0
