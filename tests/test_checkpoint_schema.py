"""checkpoint["alignkit"]: one versioned schema written by both workflows, read by eval.py, export and the resume
guard through one function, which still reads the two layouts older checkpoints carry and refuses anything else."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from helpers import TINY_VISION
from omegaconf import OmegaConf
from safetensors.torch import load_file

from alignkit.core.checkpoint import AlignkitSpec, load_checkpoint, read_alignkit_spec, resolve_checkpoint
from alignkit.core.hub import CONFIG_NAME, WEIGHTS_NAME
from alignkit.encoders.heads import LinearHead
from alignkit.losses import InfoNCE
from alignkit.run.checkpointing import check_checkpoint_compatible
from alignkit.run.evaluate import load_model
from alignkit.run.export import export_checkpoint


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Weights no fresh build has, so a reload that ignored the checkpoint would be caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _save(ckpt: dict, run, name: str = "last.ckpt"):
    path = run / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def clip_module(tiny_encoder):
    from alignkit.modules.clip_refine import AlignModule

    module = AlignModule(tiny_encoder, InfoNCE(), optimizer=torch.optim.AdamW, teacher="always")
    _perturb(module.model, 1)
    return module.eval()


@pytest.fixture
def structure_module(tiny_text_dir):
    from alignkit.encoders.frozen_towers import FrozenTowers
    from alignkit.modules.structure import StructureModule

    torch.manual_seed(0)
    towers = FrozenTowers(dict(TINY_VISION), {"kind": "hf", "path": tiny_text_dir}, context_length=16)
    module = StructureModule(
        towers, InfoNCE(), torch.optim.AdamW,
        image_head=partial(LinearHead, out_dim=16), text_head=partial(LinearHead, out_dim=16, bias=False),
    )  # fmt: skip
    _perturb(module.model, 2)
    return module.eval()


def _written(module) -> dict:
    ckpt = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(ckpt)
    return ckpt


def _encodes_like(loaded, model, images: torch.Tensor, texts: list[str]) -> None:
    tokens = loaded.tokenizer(texts)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), model.encode_image(images))
        torch.testing.assert_close(loaded.model.encode_text(tokens), model.encode_text(tokens))


def test_clip_refine_checkpoint_round_trips_and_the_old_layout_still_loads(clip_module, tmp_path):
    spec = clip_module.encoder.spec
    new = _written(clip_module)
    assert new["alignkit"] == {"schema": 1, "workflow": "clip_refine", "model": spec, "teacher": True}
    assert not any(k.startswith("teacher.") for k in new["state_dict"])
    # as the code before the schema wrote it
    old = {
        "state_dict": new["state_dict"],
        "global_step": 7,
        "alignkit": {"encoder": spec, "has_teacher": True},
    }
    images = torch.rand(2, 3, 32, 32)
    for layout, ckpt in (("new", new), ("old", old)):
        path = _save(ckpt, tmp_path / layout)
        # plain values only: the safe loader reads it
        read = read_alignkit_spec(torch.load(path, weights_only=True))
        assert read == AlignkitSpec("clip_refine", spec, True, schema=1 if layout == "new" else 0)
        loaded = load_model(ckpt=str(tmp_path / layout))  # a run directory
        assert loaded.step == 7 and "alignkit-tiny-vit" in loaded.description
        _encodes_like(loaded, clip_module.model, images, ["a cat", "two dogs"])
        out = export_checkpoint(tmp_path / layout, tmp_path / f"export_{layout}")
        cfg = json.loads((out / CONFIG_NAME).read_text())
        assert cfg["preprocess_cfg"]["mean"] == list(spec["preprocess"]["mean"])
        weights = load_file(str(out / WEIGHTS_NAME))
        for k, v in clip_module.model.state_dict().items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=0, msg=k)


def test_structure_checkpoint_round_trips_and_the_old_layout_still_loads(
    structure_module, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # the open_clip export registers its text tower
    model = structure_module.model
    new = _written(structure_module)
    assert new["alignkit"] == {"schema": 1, "workflow": "structure", "model": model.spec(), "teacher": False}
    assert not any(".towers." in k for k in new["state_dict"])
    old = {
        "state_dict": new["state_dict"],
        "global_step": 7,
        "alignkit": model.spec(),
    }  # the bare aligned spec
    images = torch.rand(2, 3, *model.towers.data_cfg["input_size"][1:])
    for layout, ckpt in (("new", new), ("old", old)):
        path = _save(ckpt, tmp_path / layout)
        read = read_alignkit_spec(torch.load(path, weights_only=True))
        assert read == AlignkitSpec("structure", model.spec(), False, schema=1 if layout == "new" else 0)
        loaded = load_model(ckpt=str(path))
        assert loaded.model.image_layer == model.image_layer and loaded.step == 7
        _encodes_like(loaded, model, images, ["a cat", "two dogs"])
        out = export_checkpoint(path, tmp_path / f"export_{layout}")
        weights = load_file(str(out / WEIGHTS_NAME))
        torch.testing.assert_close(weights["text.proj.weight"], model.text_head.proj.weight, rtol=0, atol=0)
        # a resume reads the layers through the same reader
        structure_module.on_load_checkpoint(load_checkpoint(path))
        moved = {**old["alignkit"], "image_layer": model.image_layer - 1}
        bad = {**ckpt, "alignkit": moved if layout == "old" else {**ckpt["alignkit"], "model": moved}}
        with pytest.raises(ValueError, match=r"trained on layers \(image, text\)"):
            structure_module.on_load_checkpoint(bad)


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        (
            {"schema": 2, "workflow": "clip_refine", "model": {}},
            r"has schema 2; this alignkit reads schema 1",
        ),
        ({"schema": 1, "workflow": "dino", "model": {}}, r"workflow='dino'"),
        ({"schema": 1, "workflow": "structure", "model": "x"}, r"model of type str"),
        ({"model_name": "ViT-B-32"}, r"neither older layout.*keys: \['model_name'\]"),
        (["encoder"], r"is a list, not a dict"),
    ],
)
def test_anything_else_is_refused_naming_the_problem_and_the_fix(section, problem, tmp_path):
    fix = r"(?s)alignkit version that wrote it.*model\.name=ARCH"
    ckpt = {"state_dict": {"model.w": torch.ones(1)}, "global_step": 1, "alignkit": section}
    with pytest.raises(ValueError, match=problem) as e:
        read_alignkit_spec(ckpt, "c.ckpt")
    assert e.match(fix) and str(e.value).startswith("c.ckpt: ")
    path = _save(ckpt, tmp_path)
    # every reader goes through it
    for read in (
        lambda: load_model(ckpt=str(path)),
        lambda: export_checkpoint(path, tmp_path / "out"),
        lambda: export_checkpoint(path, tmp_path / "out.safetensors"),
        lambda: check_checkpoint_compatible(path, torch.nn.Linear(1, 1), OmegaConf.create({})),
    ):
        with pytest.raises(ValueError, match=problem):
            read()


def test_no_section_is_no_spec_and_a_workflow_mismatch_is_refused(clip_module, structure_module, tmp_path):
    assert read_alignkit_spec({"state_dict": {}}) is None
    assert read_alignkit_spec({"state_dict": {}, "alignkit": {}}) is None  # the old base module's empty spec
    path = _save(_written(structure_module), tmp_path)
    with pytest.raises(ValueError, match=r"workflow: checkpoint 'structure' vs this run 'clip_refine'"):
        check_checkpoint_compatible(path, clip_module, OmegaConf.create({}))


def test_a_run_directory_resolves_to_last_or_the_newest_intact_step(tmp_path):
    ckpt = {"state_dict": {"model.w": torch.ones(1)}, "global_step": 4}
    with pytest.raises(FileNotFoundError, match=r"last\.ckpt does not exist"):
        resolve_checkpoint(tmp_path)
    _save(ckpt, tmp_path, "step0000002.ckpt")
    newest = _save(ckpt, tmp_path, "step0000004.ckpt")
    assert resolve_checkpoint(tmp_path) == newest  # no last.ckpt
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == newest  # a corrupt last.ckpt
    last = _save(ckpt, tmp_path)
    assert resolve_checkpoint(tmp_path) == last
    assert resolve_checkpoint(newest) == newest  # a file as it is


def test_run_and_rng_sections_carry_the_schema_and_their_old_layouts_still_read():
    from types import SimpleNamespace

    from alignkit.callbacks.preemption import PreemptionCheckpoint
    from alignkit.core.checkpoint import SCHEMA_VERSION, read_rng_section, read_run_section
    from alignkit.run.checkpointing import RunIdentity

    identity = {"task_name": "t", "encoder": {"model": "m"}, "loss": "l"}
    ckpt: dict = {}
    RunIdentity(identity).on_save_checkpoint(None, None, ckpt)
    PreemptionCheckpoint().on_save_checkpoint(SimpleNamespace(world_size=1), None, ckpt)
    assert ckpt["alignkit_run"] == {"schema": SCHEMA_VERSION, **identity}
    assert ckpt["alignkit_rng"]["schema"] == SCHEMA_VERSION and len(ckpt["alignkit_rng"]["ranks"]) == 1
    assert read_run_section(ckpt) == identity
    states = read_rng_section(ckpt)
    assert torch.equal(states[0]["torch"], torch.get_rng_state())  # saved now: the process's current state

    # the layouts before the schema number: the bare identity dict and the bare list of per-rank states
    old = {"alignkit_run": dict(identity), "alignkit_rng": list(states)}
    assert read_run_section(old) == identity and read_rng_section(old) == states
    for ck in (ckpt, old):  # both restore the RNG on resume
        cb = PreemptionCheckpoint()
        cb.on_load_checkpoint(SimpleNamespace(world_size=1), None, ck)
        assert cb._rng_to_restore is not None and torch.equal(
            cb._rng_to_restore[0]["torch"], states[0]["torch"]
        )
    assert read_run_section({}) is None and read_rng_section({}) is None


@pytest.mark.parametrize(
    "key, section, problem",
    [
        ("alignkit_run", {"schema": 2, "task_name": "t"}, r"checkpoint\['alignkit_run'\] has schema 2"),
        ("alignkit_run", ["t"], r"checkpoint\['alignkit_run'\] is a list, not a dict"),
        ("alignkit_rng", {"schema": 2, "ranks": []}, r"checkpoint\['alignkit_rng'\] has schema 2"),
        ("alignkit_rng", {"torch": 1}, r"neither a list of per-rank states nor a dict with 'ranks'"),
    ],
)
def test_a_run_or_rng_section_of_another_schema_is_refused_naming_the_fix(key, section, problem, tmp_path):
    from alignkit.core.checkpoint import read_rng_section, read_run_section

    read = read_run_section if key == "alignkit_run" else read_rng_section
    with pytest.raises(ValueError, match=problem) as e:
        read({key: section}, "c.ckpt")
    assert e.match(r"alignkit version that wrote it, or start fresh \(ckpt_path=null\)")
    # the resume guard reads the run section through it
    if key == "alignkit_run":
        path = _save({"state_dict": {}, key: section}, tmp_path)
        with pytest.raises(ValueError, match=problem):
            check_checkpoint_compatible(path, torch.nn.Linear(1, 1), OmegaConf.create({}))
