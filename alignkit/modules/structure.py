"""LightningModule for aligning frozen encoders: two heads on selected tower layers, trained with a loss node
(STRUCTURE: InfoNCE + λ·R_S; the plain InfoNCE baseline is the same loss with ``use_structure=false``).

Batches are either cached features (``image_inputs`` / ``text_inputs``, from
:class:`~alignkit.data.features.FeaturePairDataModule`) or raw ``image`` / ``text`` tensors (online path: the
frozen towers run under ``no_grad`` inside the step). Checkpoints hold the heads only: the towers' weights are
dropped on save and taken from the freshly built towers on load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignkit.core.checkpoint import read_alignkit_spec
from alignkit.encoders.aligned import (
    TOWERS_PREFIX,
    AlignedDualEncoder,
    export_open_clip,
    head_spec,
    save_aligned,
    structure_card,
)
from alignkit.encoders.frozen_towers import FrozenTowers
from alignkit.modules.base import TrainingModule
from alignkit.modules.schedulers import LRSchedule

log = logging.getLogger(__name__)

__all__ = ["StructureModule"]
MODEL_TOWERS = "model." + TOWERS_PREFIX


def _temperature(loss: nn.Module, default: float = 0.05) -> float:
    for m in loss.modules():
        if hasattr(m, "temperature") and isinstance(m.temperature, float):
            return m.temperature
    return default


class StructureModule(TrainingModule):
    """Train two alignment heads on frozen towers.

    Args:
        encoder: the :class:`FrozenTowers` node.
        loss: a loss node reading ``image_features``, ``text_features``, ``image_inputs``, ``text_inputs``, ``step``.
        optimizer: partial optimizer taking param groups; scheduler: :class:`LRSchedule`.
        image_layer / text_layer / image_dim / text_dim: the selected layers and their widths (filled in by the
            data node's ``prepare_features``; ``*_dim`` default to a dummy forward).
        head: head factory for both sides (``partial(LinearHead, out_dim=512)``); ``image_head`` / ``text_head``
            override one side.
        head_init: ``default`` or ``cca`` (heads set to the analytic CCA projections of the training features,
            the CSA-style baseline; with ``epochs=0`` it is training-free).
        cca: ``CCAAligner`` options (``reg``, ``weighting``).
    """

    non_checkpointed_prefixes = (MODEL_TOWERS,)  # the frozen towers are rebuilt from their source on load
    workflow = "structure"

    def __init__(
        self,
        encoder: FrozenTowers,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: LRSchedule | None = None,
        image_layer: int = -1,
        text_layer: int = -1,
        image_dim: int | None = None,
        text_dim: int | None = None,
        head: Callable[..., nn.Module] | None = None,
        image_head: Callable[..., nn.Module] | None = None,
        text_head: Callable[..., nn.Module] | None = None,
        head_init: Literal["default", "cca"] = "default",
        cca: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head_init not in ("default", "cca"):
            raise ValueError(f"module.head_init={head_init!r} is not one of default, cca")
        from functools import partial

        from alignkit.encoders.heads import LinearHead

        li = encoder.vision.resolve_layers([image_layer])[0]
        lt = encoder.text.resolve_layers([text_layer])[0]
        if image_dim is None or text_dim is None:
            image_dim, text_dim = encoder.layer_dims(li, lt)
        head = head or partial(LinearHead, out_dim=512)
        fi, ft = image_head or head, text_head or head
        self.model = AlignedDualEncoder(
            encoder, li, lt, fi(in_dim=image_dim), ft(in_dim=text_dim), _temperature(loss),
            {"image": head_spec(fi), "text": head_spec(ft)},
        )  # fmt: skip
        self.loss = loss
        self.optimizer_factory = optimizer
        self.lr_schedule = scheduler or LRSchedule()
        self.head_init, self.cca = head_init, dict(cca or {})

    @property
    def encoder(self) -> FrozenTowers:
        # Not a second registered submodule: the towers live once, at model.towers.
        return self.model.towers

    # ----- checkpoints hold the heads only -----
    def model_spec(self) -> dict[str, Any]:
        return self.model.spec()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = read_alignkit_spec(checkpoint)
        spec = saved.model if saved is not None and saved.workflow == self.workflow else {}
        want = (spec.get("image_layer"), spec.get("text_layer"))
        have = (self.model.image_layer, self.model.text_layer)
        if spec and want != have:
            raise ValueError(
                f"checkpoint was trained on layers (image, text) = {want} but this run selected {have}; the data, "
                "the encoders or data.selection changed. Start a fresh run or pin data.selection.mode=fixed "
                f"data.image_layer={want[0]} data.text_layer={want[1]}."
            )

    # ----- what evaluation and export see -----
    def eval_interface(self) -> tuple[nn.Module, Callable, Callable]:
        """(model with ``encode_image`` / ``encode_text``, tokenizer, eval preprocess)."""
        return self.model, self.encoder.tokenizer, self.encoder.preprocess_val

    def export_to(
        self,
        run_dir: str | Path,
        run_cfg: Mapping[str, Any] | None = None,
        history: Mapping[Any, Mapping[str, float]] | None = None,
    ) -> dict[str, str]:
        """alignkit format in ``run_dir/model`` and, when possible, an open_clip hub-layout directory in
        ``run_dir/open_clip`` (its model card from ``run_cfg`` and the evaluation ``history``)."""
        out = {"alignkit": str(save_aligned(self.model, Path(run_dir) / "model"))}
        trainer = getattr(self, "_trainer", None)
        steps = trainer.global_step if trainer is not None else None
        card = structure_card(self.model.spec(), run_cfg, history, steps)
        try:
            out["open_clip"] = str(export_open_clip(self.model, Path(run_dir) / "open_clip", card=card))
        except ValueError as err:
            log.info("%s; the alignkit format (alignkit.encoders.aligned.load_aligned) is the export", err)
        return out

    # ----- setup -----
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.head_init == "cca":
            self._init_heads_cca()  # a resumed run overwrites these with the checkpoint's heads afterwards

    @torch.no_grad()
    def _init_heads_cca(self) -> None:
        from alignkit.encoders.heads import LinearHead
        from alignkit.features.csa import CCAAligner

        heads = (self.model.image_head, self.model.text_head)
        if not all(isinstance(h, LinearHead) and h.proj.bias is not None for h in heads):
            raise ValueError("module.head_init=cca needs linear heads with a bias")
        x, y = self.trainer.datamodule.paired_features()
        out_dim = heads[0].proj.out_features
        cca = CCAAligner(dim=out_dim, **self.cca).fit(x, y)
        for h, mean, proj in ((heads[0], cca.mean_x, cca.proj_x), (heads[1], cca.mean_y, cca.proj_y)):
            scale = (
                cca.correlations if cca.weighting == "corr" else torch.ones(proj.shape[1], dtype=proj.dtype)
            )
            w = (proj * scale).T  # (dim, D); fewer canonical dims than out_dim: the extra outputs stay 0
            h.proj.weight.zero_()
            h.proj.bias.zero_()
            h.proj.weight[: w.shape[0]] = w.float()
            h.proj.bias[: w.shape[0]] = -(mean @ proj * scale).float()
        log.info(
            "heads initialised by CCA (%d canonical dims, top correlation %.3f)",
            w.shape[0],
            cca.correlations[0],
        )

    # ----- training -----
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "image_inputs" in batch:
            xi, xt = batch["image_inputs"], batch["text_inputs"]
        else:  # online: frozen towers in the loop
            xi, xt = self.model.image_inputs(batch["image"]), self.model.text_inputs(batch["text"])
        out = {
            "image_features": self.model.image_head(xi),
            "text_features": self.model.text_head(xt),
            "image_inputs": xi,
            "text_inputs": xt,
            "step": self.global_step,
        }
        terms = self.loss(out)
        self.log_step(terms, out, xi.shape[0])
        return terms["loss"]
