"""FSDP with open_clip's scalar logit_scale and a frozen teacher (alignkit.modules.scalar_params).

Lightning's FSDPStrategy refuses a CPU accelerator, so this wraps the module with PyTorch's FSDP directly, on gloo in
one CPU process (FSDP runs NO_SHARD there; the scalar check that failed on the GPU runs all the same)."""

import pytest
import torch
import torch.distributed as dist
from helpers import free_port
from open_clip.transformer import ResidualAttentionBlock
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.losses.contrastive import InfoNCE
from alignkit.modules.clip_refine import AlignModule
from alignkit.modules.scalar_params import demote_in_state_dict


@pytest.fixture
def gloo_group(monkeypatch):
    # monkeypatch, not os.environ: a MASTER_PORT left in the pytest process leaks into every later subprocess
    # (a SLURM job inheriting it tried to listen on this test's port)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _module(seed: int = 0) -> AlignModule:
    torch.manual_seed(seed)
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)
    return AlignModule(enc, InfoNCE(), optimizer=torch.optim.AdamW, teacher="always")


def _wrap(m: AlignModule) -> FSDP:
    policy = ModuleWrapPolicy({ResidualAttentionBlock})  # as configs/trainer/fsdp.yaml
    return FSDP(m, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def _full_state_dict(w: FSDP) -> dict:
    with FSDP.state_dict_type(w, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        return w.state_dict()


def test_configure_model_promotes_only_under_the_fsdp_strategy():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    plain, sharded = _module(), _module()
    plain._trainer = SimpleNamespace(strategy=SingleDeviceStrategy("cpu"))
    sharded._trainer = SimpleNamespace(strategy=FSDPStrategy())
    plain.configure_model()
    sharded.configure_model()
    assert plain.model.logit_scale.shape == () and plain._promoted_scalars == ()
    assert sharded.model.logit_scale.shape == (1,) and sharded.teacher.logit_scale.shape == (1,)
    sharded.configure_model()  # idempotent: Lightning calls it once per stage
    assert sharded._promoted_scalars == ("model.logit_scale", "teacher.logit_scale")
    ckpt = {"state_dict": sharded.state_dict()}
    sharded.on_save_checkpoint(ckpt)  # the checkpoint keeps open_clip's 0-dim scale (teacher keys dropped)
    assert ckpt["state_dict"]["model.logit_scale"].shape == ()
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    fresh = _module()
    fresh.load_state_dict(ckpt["state_dict"])  # a plain (DDP / 1-device) module resumes from it


def test_unpromoted_scalars_are_what_fsdp_refuses(gloo_group):
    with pytest.raises(ValueError, match="scalar parameters"):
        _wrap(_module())


def test_fsdp_wraps_trains_and_saves_open_clip_scalars(gloo_group):
    m = _module()
    start = float(m.model.logit_scale.detach())
    m.promote_scalar_params()
    assert m._promoted_scalars == ("model.logit_scale", "teacher.logit_scale")
    assert not [n for n, p in m.named_parameters() if p.ndim == 0]
    assert not m.teacher.logit_scale.requires_grad  # still frozen
    w = _wrap(m)

    # a step through the wrapper: the promoted scale broadcasts and receives its gradient
    opt = torch.optim.SGD([p for p in w.parameters() if p.requires_grad], lr=1.0)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16))
    out = w(images, tokens)
    terms = m.loss(out)
    terms["loss"].backward()
    opt.step()
    moved = float(m.model.logit_scale)
    assert moved != start

    # the checkpoint format is open_clip's: 0-dim scales, loadable by a plain open_clip model
    sd = _full_state_dict(w)
    demote_in_state_dict(sd, m._promoted_scalars)
    assert sd["model.logit_scale"].shape == () and float(sd["model.logit_scale"]) == pytest.approx(moved)
    plain = _module(seed=1).model
    plain.load_state_dict({k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")})
    assert float(plain.logit_scale) == pytest.approx(moved)

    # resume: the 0-dim checkpoint entries load into a promoted module, through FSDP's wrapper too
    again = _module(seed=2)
    again.promote_scalar_params()
    w2 = _wrap(again)
    with FSDP.state_dict_type(w2, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        w2.load_state_dict(sd)
    assert again.model.logit_scale.shape == (1,) and float(again.model.logit_scale) == pytest.approx(moved)
    torch.testing.assert_close(again.model.visual.conv1.weight, m.model.visual.conv1.weight)
