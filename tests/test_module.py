"""The LightningModule: frozen teacher semantics, optimizer contents, checkpoint contents and resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from safetensors.torch import save_file

from alignkit.data import ImageTextDataModule
from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.modules.base import batch_modality_gap
from alignkit.modules.clip_refine import AlignModule
from alignkit.modules.schedulers import LRSchedule
from alignkit.run.checkpointing import AtomicCheckpointIO, atomic_torch_save


def build(start_file, lr=1e-3):
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=str(start_file))
    loss = instantiate(compose_train(["+experiment=smoke"]).loss)
    dm = ImageTextDataModule(
        source="synthetic", num_samples=64, batch_size=16, num_workers=0, pin_memory=False
    )
    dm.attach(enc.preprocess_train, enc.preprocess_val, enc.tokenizer)
    opt = lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.1)  # noqa: E731
    return AlignModule(enc, loss, opt, LRSchedule()), dm


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
    assert sd["alignkit"]["encoder"]["model"] == "alignkit-tiny-vit"
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
