"""The experiments of the added objectives compose to their base recipe with only the loss (and stated fields)
changed, and their loss nodes run on a batch of the right shape."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alignkit.losses import Alignment, CalibratedUniformity, SoftenedInfoNCE, Uniformity
from alignkit.losses.structure import StructureLoss


def _without(cfg, *keys):
    d = OmegaConf.to_container(cfg, resolve=False)
    for k in keys:
        d.pop(k)
    return d


def test_clip_experiments_are_the_clip_refine_recipe_with_another_objective():
    base = compose_train(["+experiment=clip_refine"])
    au = compose_train(["+experiment=clip_align_uniform"])
    lc = compose_train(["+experiment=clip_lightclip"])
    for cfg in (au, lc):
        assert _without(cfg, "loss", "task_name") == _without(base, "loss", "task_name")
    loss = instantiate(au.loss)
    assert set(loss.terms) == {"align", "uniform"} and loss.weights == {"align": 1.0, "uniform": 1.0}
    assert isinstance(loss.terms["align"], Alignment) and isinstance(loss.terms["uniform"], Uniformity)
    assert not loss.requires_teacher  # no frozen teacher is built for it
    soft = instantiate(lc.loss).terms["lightclip"]
    assert isinstance(soft, SoftenedInfoNCE) and soft.softening_steps == 228 and soft.mass_to == "negatives"
    g = torch.Generator().manual_seed(0)
    out = {
        "image_features": torch.randn(8, 16, generator=g),
        "text_features": torch.randn(8, 16, generator=g),
        "logit_scale": torch.tensor(100.0),
        "step": 114,
    }
    res = instantiate(lc.loss)(out)
    assert res["lightclip_softening"].item() == pytest.approx(0.05)  # half-way up the 228-step ramp
    assert {"loss", "loss_align", "loss_uniform", "uniform_image"} <= set(loss(out))


def test_structure_cm3_experiment_is_last_layers_rs_plus_calibrated_uniformity():
    base = compose_train(["+experiment=structure_offline_noselect"])
    cfg = compose_train(["+experiment=structure_offline_last_rs_cm3"])
    assert _without(cfg, "loss", "task_name") == _without(base, "loss", "task_name")
    assert cfg.data.selection.mode == "last"
    # the STRUCTURE term is exactly the one of the base experiment (R_S on, the offline warm-up)
    assert OmegaConf.to_container(cfg.loss.align) == OmegaConf.to_container(base.loss.align)
    loss = instantiate(cfg.loss)
    assert isinstance(loss.terms["align"], StructureLoss) and loss.terms["align"].use_structure
    cm3 = loss.terms["cm3"]
    assert isinstance(cm3, CalibratedUniformity) and cm3.source == "inputs" and cm3.combine == "fused"
    g = torch.Generator().manual_seed(1)
    out = {
        "image_features": torch.randn(8, 16, generator=g),
        "text_features": torch.randn(8, 16, generator=g),
        "image_inputs": torch.randn(8, 24, generator=g),
        "text_inputs": torch.randn(8, 12, generator=g),
        "step": 50,
    }
    res = loss(out)
    total = res["loss_align"] + res["loss_cm3"]  # both weights are 1
    assert torch.allclose(res["loss"].detach(), total) and {
        "cm3_image",
        "cm3_text",
        "align_lambda_structure",
    } <= set(res)
