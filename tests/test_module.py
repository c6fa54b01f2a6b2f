"""The LightningModule: frozen teacher semantics, optimizer contents, checkpoint contents and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from safetensors.torch import save_file

from alignkit.core.checkpoint import AtomicCheckpointIO, atomic_torch_save
from alignkit.data import ImageTextDataModule
from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.modules.base import batch_modality_gap
from alignkit.modules.clip_refine import AlignModule
from alignkit.modules.schedulers import LRSchedule


def build(start_file, lr=1e-3, batchnorm=False, **module_kwargs):
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=str(start_file))
    if (
        batchnorm
    ):  # a BatchNorm after the patch embedding, with non-trivial running statistics, like a CNN tower
        conv = enc.module.visual.conv1
        norm = torch.nn.BatchNorm2d(conv.out_channels)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            norm.running_mean.uniform_(-1.0, 1.0, generator=gen)
            norm.running_var.uniform_(0.5, 2.0, generator=gen)
        enc.module.visual.conv1 = torch.nn.Sequential(conv, norm)
    loss = instantiate(compose_train(["+experiment=smoke"]).loss)
    dm = ImageTextDataModule(
        source="synthetic", num_samples=64, batch_size=16, num_workers=0, pin_memory=False
    )
    dm.attach(enc.preprocess_train, enc.preprocess_val, enc.tokenizer)
    opt = lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)  # noqa: E731
    return AlignModule(enc, loss, opt, LRSchedule(), **module_kwargs), dm


def fit(module, dm, steps, tmp_path, ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def start_file(tmp_path, tiny_encoder):
    path = tmp_path / "start.safetensors"
    save_file(tiny_encoder.module.state_dict(), path)
    return path


def test_teacher_frozen_and_outside_the_optimizer(start_file, tmp_path):
    module, dm = build(start_file)
    original = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, dm, 3, tmp_path)
    teacher = module.teacher.state_dict()
    for k, v in original.items():
        assert torch.equal(teacher[k], v), f"teacher weight {k} changed"
    assert any(
        not torch.equal(module.model.state_dict()[k], v) for k, v in original.items() if v.is_floating_point()
    )
    assert not module.teacher.training and all(not p.requires_grad for p in module.teacher.parameters())
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in module.teacher.parameters()}
    assert opt_ids == {id(p) for _, p in module.trainable_parameters()}


def test_checkpoint_has_no_teacher_and_resume_keeps_the_original_teacher(start_file, tmp_path):
    module, dm = build(start_file)
    trainer = fit(module, dm, 4, tmp_path)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("teacher.") for k in sd["state_dict"])
    assert sd["alignkit"]["model"]["model"] == "alignkit-tiny-vit" and sd["alignkit"]["teacher"] is True
    student_after = {k: v.clone() for k, v in module.model.state_dict().items()}
    # a fresh process resumes: the student comes from the checkpoint, the teacher from the starting weights
    resumed, dm2 = build(start_file)
    trainer2 = fit(resumed, dm2, 4, tmp_path, ckpt_path=str(ckpt))  # max_steps reached at once: load only
    assert trainer2.global_step == 4
    start = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=str(start_file)).module.state_dict()
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(v, start[k])
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, student_after[k])


def test_weight_decay_groups():
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)
    module = AlignModule(
        enc, instantiate(compose_train(["loss=contrastive"]).loss), lambda g: torch.optim.AdamW(g)
    )
    module.trainer = L.Trainer(
        accelerator="cpu", max_steps=10, logger=False
    )  # for estimated_stepping_batches
    groups = module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in module.trainable_parameters()}
    no_decay = [names[id(p)] for p in groups[1]["params"]]
    assert groups[1]["weight_decay"] == 0.0 and "model.logit_scale" in no_decay
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert module.teacher is None  # a contrastive loss needs no teacher


def test_batch_modality_gap_by_hand():
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[-1.0, 0.0], [-5.0, 0.0]])
    # normalised: img -> (1,0),(0,1) mean (.5,.5); txt -> (-1,0),(-1,0) mean (-1,0); gap = ||(1.5, .5)||
    assert batch_modality_gap(img, txt).item() == pytest.approx((1.5**2 + 0.5**2) ** 0.5)


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": 2, "b": Boom()}, path)
    assert torch.load(path, weights_only=False) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_norm_stats_fixes_batchnorm_statistics_but_trains_its_weights(start_file, tmp_path, freeze):
    module, dm = build(start_file, batchnorm=True, freeze_norm_stats=freeze)
    norm = module.model.visual.conv1[1]
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    fit(module, dm, 2, tmp_path)
    after = {k: v.clone() for k, v in norm.state_dict().items()}
    assert not torch.equal(after["weight"], before["weight"]) and not torch.equal(
        after["bias"], before["bias"]
    )
    if not freeze:  # released behaviour: train-mode BatchNorm re-estimates its statistics from the batches
        assert all(not torch.equal(after[k], before[k]) for k in STATS)
        return
    for k in STATS:
        assert torch.equal(after[k], before[k]), f"{k} changed although freeze_norm_stats=true"
    # eval mode whatever toggles it: Lightning's train(), and the evaluation pass's model.train(was_training)
    module.train()
    assert module.model.training and module.model.visual.conv1[0].training and not norm.training
    module.model.train(True)
    module.on_train_batch_start({}, 0)
    assert not norm.training and module.model.visual.training
    # a train-mode forward normalises with the fixed running statistics (the formula, by hand)
    x = torch.randn(4, norm.num_features, 3, 3)
    shape = (1, -1, 1, 1)
    scale = norm.weight.view(shape) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
    want = (x - norm.running_mean.view(shape)) * scale + norm.bias.view(shape)
    torch.testing.assert_close(norm(x), want)
    # resume-safe: a fresh process resuming from a checkpoint keeps the statistics fixed too
    ckpt = tmp_path / "mid.ckpt"
    module.trainer.save_checkpoint(ckpt)
    resumed, dm2 = build(start_file, batchnorm=True, freeze_norm_stats=True)
    fit(resumed, dm2, 4, tmp_path, ckpt_path=str(ckpt))
    norm2 = resumed.model.visual.conv1[1]
    assert resumed.global_step == 4 and not torch.equal(norm2.weight, after["weight"])
    for k in STATS:
        assert torch.equal(norm2.state_dict()[k], before[k]), f"{k} changed after resume"
