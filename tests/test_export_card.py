"""Model cards (huggingface_hub ``ModelCard``) of both workflows, and the "no export" hint as a working override."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_train
from huggingface_hub import ModelCard

from alignkit.encoders.aligned import structure_card
from alignkit.encoders.hub_cache import MINILM_HUB_ID
from alignkit.run.export import main

STRUCTURE_SPEC = {"towers": {"vision": {"kind": "effnet_lite0_offline"}, "text": {"kind": "minilm_offline"}}}


def _card_front_matter(text: str) -> dict:
    return ModelCard(text).data.to_dict()


def test_structure_card_front_matter_steps_and_readable_base_model():
    cfg = {"task_name": "structure_offline", "trainer": {"max_steps": -1}, "optimizer": {"lr": 0.001},
           "data": {"train_shards": "data/structure_offline/train"}}  # fmt: skip
    history = {"0": {"val/zs/a/top1": 0.1}, "1080": {"val/zs/a/top1": 0.6}}
    text = structure_card(STRUCTURE_SPEC, cfg, history, steps=1080)
    meta = _card_front_matter(text)
    assert meta["library_name"] == "open_clip"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["license"] == "other"
    assert meta["base_model"] == ["timm/tf_efficientnet_lite0", MINILM_HUB_ID]
    assert meta["datasets"] == ["structure_offline"]
    assert "* `steps trained`: 1080" in text and "max_steps" not in text
    base = next(line for line in text.splitlines() if line.startswith("* **Base model:**"))
    assert "{" not in base and "tf_efficientnet_lite0" in base and MINILM_HUB_ID in base
    assert "--no_amp" in text and "--pretrained alignkit" in text


def test_checkpoint_export_card_counts_the_steps_the_run_took(tmp_path):
    import open_clip

    from alignkit.encoders.openclip import register_shipped_configs

    register_shipped_configs()
    student = open_clip.create_model("alignkit-tiny-vit")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    spec = {"kind": "open_clip", "model": "alignkit-tiny-vit", "pretrained": None}
    ckpt = {"state_dict": {"model." + k: v for k, v in student.state_dict().items()},
            "alignkit": {"encoder": spec}, "global_step": 64}  # fmt: skip
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("task_name: smoke\ntrainer:\n  max_steps: -1\n")
    (run / "metrics.json").write_text(
        json.dumps({"0": {"val/zs/a/top1": 0.25}, "60": {"val/zs/a/top1": 0.5}})
    )
    main([str(run), str(tmp_path / "export")])
    text = (tmp_path / "export" / "README.md").read_text()
    assert (
        "* `steps trained`: 64" in text and "max_steps" not in text
    )  # the checkpoint's step, not the config's -1
    assert _card_front_matter(text)["library_name"] == "open_clip"


@pytest.mark.parametrize("experiment", ["structure_offline_select", "structure"])
def test_the_no_export_hint_composes_as_printed(experiment, tmp_path):
    from alignkit.encoders.aligned import AlignedDualEncoder, open_clip_blocker
    from alignkit.encoders.heads import LinearHead

    class _Tower:
        num_layers = 1

    class _Towers:
        vision = text = _Tower()

    model = AlignedDualEncoder.__new__(AlignedDualEncoder)
    torch.nn.Module.__init__(model)
    model.towers, model.image_layer, model.text_layer = _Towers(), 0, 0
    model.image_head, model.text_head = LinearHead(4, 2), LinearHead(4, 2)
    reason = open_clip_blocker(model)
    hint = reason.split("train with ")[1].rstrip(")")
    # the printed override composes whether or not the experiment already names the key
    cfg = compose_train([f"+experiment={experiment}", hint], tmp_path)
    assert cfg.module.text_head.bias is False
