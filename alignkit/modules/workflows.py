"""One object per workflow: what a checkpoint's ``workflow`` means for everyone who reads it.

A checkpoint records its workflow in ``checkpoint["alignkit"]`` (:class:`alignkit.core.checkpoint.AlignkitSpec`).
:func:`workflow_of` picks the object once; evaluation (:mod:`alignkit.run.evaluate`), export
(:mod:`alignkit.run.export`) and the resume guard (:mod:`alignkit.run.checkpointing`) call its methods instead of
comparing workflow strings:

* :meth:`Workflow.rebuild` — the trained model for evaluation (open_clip student / frozen towers + heads);
* :meth:`Workflow.write_open_clip` — the open_clip hub-layout export with its model card;
* :meth:`Workflow.resume_problems` — what must match between a checkpoint and the run that resumes it;
* :attr:`Workflow.module_class` — the LightningModule that trains it (its ``workflow`` attribute is the key).

A new workflow is one subclass here plus its name in :data:`alignkit.core.checkpoint.WORKFLOWS` (the schema's list,
which ``tests/test_workflows.py`` keeps equal to :data:`WORKFLOWS`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import open_clip
from torch import nn

from alignkit.core.checkpoint import AlignkitSpec, extract_state_dict, find_architecture
from alignkit.core.hub import preprocess_cfg_of, run_card, write_open_clip_dir
from alignkit.encoders.aligned import aligned_from_spec, export_open_clip, structure_card
from alignkit.encoders.openclip import open_clip_model_cfg, register_shipped_configs, save_hf_text_files
from alignkit.modules.base import TrainingModule
from alignkit.modules.clip_refine import AlignModule
from alignkit.modules.structure import StructureModule

__all__ = ["WORKFLOWS", "ClipRefineWorkflow", "Rebuilt", "StructureWorkflow", "Workflow", "workflow_of"]


@dataclass
class Rebuilt:
    """A checkpoint's model, rebuilt for evaluation: open_clip-style model, tokenizer, eval preprocess, label."""

    model: nn.Module
    tokenizer: Any
    preprocess: Any
    description: str


class Workflow(ABC):
    name: ClassVar[str]
    module_class: ClassVar[type[TrainingModule]]

    @abstractmethod
    def rebuild(
        self, ckpt: Mapping[str, Any], spec: Mapping[str, Any], source: str, arch: str | None, precision: str
    ) -> Rebuilt:
        """The model a checkpoint holds (``spec``: its recorded model spec; ``arch``: a user's architecture
        override, where the workflow has one)."""

    @abstractmethod
    def write_open_clip(
        self,
        ckpt: Mapping[str, Any],
        spec: Mapping[str, Any],
        out_dir: str | Path,
        prefix: str,
        run_cfg: Mapping | None,
        history: Mapping | None,
    ) -> Path:
        """The open_clip hub-layout directory (weights, config, model card) of a checkpoint dict."""

    def resume_problems(self, spec: Mapping[str, Any], module: nn.Module) -> list[str]:
        """Differences between a checkpoint's model spec and the module about to resume from it."""
        return []


class ClipRefineWorkflow(Workflow):
    """An open_clip student (CLIP-Refine or any loss on an open_clip model), rebuilt with open_clip itself."""

    name = "clip_refine"
    module_class = AlignModule

    def rebuild(self, ckpt, spec, source, arch, precision):
        if spec.get("kind", "open_clip") != "open_clip":
            raise ValueError(
                f"{source}: the student is a {spec.get('kind')!r} model, which eval.py cannot rebuild; evaluate "
                "the run with the training callback (evalsets=...)."
            )
        arch = arch or find_architecture(ckpt)
        if arch is None:
            raise ValueError(
                f"{source}: the checkpoint does not record its open_clip architecture; pass model.name=ARCH"
            )
        register_shipped_configs()
        if open_clip.factory.parse_model_name(arch)[0] is None and arch not in open_clip.list_models():
            raise ValueError(f"{source}: unknown open_clip architecture {arch!r}; pass model.name=ARCH")
        pp = spec.get("preprocess") or {}
        # Random init, then the trained weights: the starting weights (e.g. a pretrained tag) are never needed.
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=None,
            precision=precision,
            force_quick_gelu=bool(spec.get("force_quick_gelu", False)),
            image_mean=tuple(pp["mean"]) if "mean" in pp else None,
            image_std=tuple(pp["std"]) if "std" in pp else None,
            image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"),
        )
        result = model.load_state_dict(extract_state_dict(ckpt), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{source}: weights do not fit open_clip {arch!r}: missing {result.missing_keys[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}. Pass the right model.name=ARCH."
            )
        return Rebuilt(model, open_clip.get_tokenizer(arch), preprocess, f"{arch} from {source}")

    def write_open_clip(self, ckpt, spec, out_dir, prefix, run_cfg, history):
        if spec.get("kind", "open_clip") != "open_clip" or "model" not in spec:
            raise ValueError(
                "the checkpoint does not record an open_clip student (ckpt['alignkit'] of a CLIP-Refine run); "
                "export to OUT.safetensors and pass the architecture to open_clip yourself"
            )
        model_cfg = open_clip_model_cfg(spec)
        base = f"{spec['model']} (pretrained={spec.get('pretrained')})"
        card = run_card(
            f"{spec['model']} refined with alignkit", base, run_cfg, history, steps=ckpt.get("global_step")
        )
        state = extract_state_dict(ckpt, prefix)
        out = write_open_clip_dir(
            out_dir, state, model_cfg, preprocess_cfg_of(spec.get("preprocess") or {}), card
        )
        save_hf_text_files(model_cfg, spec["model"], out)
        return out

    def resume_problems(self, spec, module):
        enc = getattr(getattr(module, "encoder", None), "spec", None) or {}
        return [
            f"encoder {k}: checkpoint {spec.get(k)!r} vs this run {enc.get(k)!r}"
            for k in ("kind", "model", "pretrained")
            if enc and spec.get(k) != enc.get(k)
        ]


class StructureWorkflow(Workflow):
    """Frozen unimodal towers (rebuilt from their specs) + trained heads."""

    name = "structure"
    module_class = StructureModule

    def rebuild(self, ckpt, spec, source, arch, precision):
        if arch:
            raise ValueError(
                f"{source}: model.name applies to open_clip students, not to a frozen-encoder run"
            )
        model, tokenizer, preprocess = aligned_from_spec(spec, extract_state_dict(ckpt), source=source)
        layers = f"layers {model.image_layer}/{model.text_layer}"
        return Rebuilt(model, tokenizer, preprocess, f"frozen towers + heads ({layers}) from {source}")

    def write_open_clip(self, ckpt, spec, out_dir, prefix, run_cfg, history):
        model, _, _ = aligned_from_spec(spec, extract_state_dict(ckpt, prefix), source="checkpoint")
        card = structure_card(spec, run_cfg, history, ckpt.get("global_step"))
        return export_open_clip(model, out_dir, card=card)


WORKFLOWS: dict[str, Workflow] = {w.name: w for w in (ClipRefineWorkflow(), StructureWorkflow())}


def workflow_of(saved: AlignkitSpec | None) -> Workflow:
    """The workflow a checkpoint records. A Lightning checkpoint no alignkit module wrote (no section) is read as
    an open_clip student, its architecture searched in its hyper-parameters."""
    return WORKFLOWS[saved.workflow if saved is not None else ClipRefineWorkflow.name]
