"""The LightningModule: a student open_clip model, an optional frozen teacher, and a loss node."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from alignkit.encoders.openclip import OpenCLIPEncoder
from alignkit.modules.base import TrainingModule
from alignkit.modules.compile import compile_options
from alignkit.modules.schedulers import LRSchedule

log = logging.getLogger(__name__)
# The frozen teacher is in eval mode on purpose; Lightning's start-of-fit notice about eval-mode modules is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# The module reads the loader's host-side counters in on_before_batch_transfer (the datamodule defines no such hook);
# Lightning warns that the module's hook is used whenever a datamodule is passed, which is what is meant here.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`"
)
TEACHER_PREFIX = "teacher."


class AlignModule(TrainingModule):
    """Train an open_clip model (all or part of it) with a loss node, optionally against a frozen teacher.

    Args:
        encoder: the student (an :class:`OpenCLIPEncoder`); its ``module`` is trained.
        loss: a loss node (e.g. :class:`alignkit.losses.WeightedLoss`).
        optimizer: a partial optimizer constructor taking param groups (Hydra ``_partial_: true``).
        scheduler: an :class:`LRSchedule`, stepped each optimizer step.
        teacher: ``auto`` builds a frozen copy of the starting model when the loss needs one, ``always`` / ``never``.
        teacher_dtype: dtype the teacher's weights are kept in (``float32``; ``bfloat16`` halves its cost on GPU).
        weight_decay_on_all: apply weight decay to every parameter (the released CLIP-Refine code) instead of
            excluding biases, norms and the logit scale (open_clip's trainer).
        accumulation: ``none`` (Lightning's ``trainer.accumulate_grad_batches`` remains available) or
            ``cache_recompute``: the per-device batch is processed in micro-batches of ``micro_batch_size`` while the
            loss still sees every negative (:mod:`alignkit.modules.accumulation`; manual optimisation).
        freeze_norm_stats: keep every BatchNorm layer of the student in eval mode while training: its running
            mean / variance stay those of the starting model (normalisation uses them), while its weights and affine
            parameters are still trained. ``False`` (default) is the released behaviour (train-mode BatchNorm). A
            CNN tower with BatchNorm (e.g. timm's EfficientNet) otherwise re-estimates its statistics from a few small
            refinement batches, which alone can wreck zero-shot accuracy; ViTs have no BatchNorm and are unaffected.
        compile: ``{enabled, backend, mode, fullgraph, dynamic}``: ``torch.compile`` the student's and teacher's
            towers in place when the Trainer configures the model (alignkit/modules/compile.py); off by default.

    The teacher is deep-copied at construction, i.e. from the *starting* weights, before any checkpoint is
    restored, and its weights are never written to checkpoints: a resumed run therefore distils from the original
    model, not from the resumed student (the released CLIP-Refine code gets this wrong).
    """

    non_checkpointed_prefixes = (TEACHER_PREFIX,)  # rebuilt from the starting weights on load
    workflow = "clip_refine"

    def __init__(
        self,
        encoder: OpenCLIPEncoder,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: LRSchedule | None = None,
        teacher: str = "auto",
        teacher_dtype: str = "float32",
        weight_decay_on_all: bool = False,
        accumulation: str = "none",
        micro_batch_size: int | None = None,
        freeze_norm_stats: bool = False,
        compile: Mapping[str, Any] | bool | None = None,
    ) -> None:
        super().__init__()
        self.compile_options = compile_options(compile)
        if accumulation not in ("none", "cache_recompute"):
            raise ValueError(f"module.accumulation={accumulation!r} is not one of none, cache_recompute")
        if accumulation == "cache_recompute" and not micro_batch_size:
            raise ValueError("module.accumulation=cache_recompute needs module.micro_batch_size (e.g. 64)")
        self.accumulation = accumulation
        self.micro_batch_size = micro_batch_size
        self.automatic_optimization = accumulation == "none"
        if teacher not in ("auto", "always", "never"):
            raise ValueError(f"module.teacher={teacher!r} is not one of auto, always, never")
        self.encoder = encoder
        self.model = encoder.module
        self.loss = loss
        self.optimizer_factory = optimizer
        self.lr_schedule = scheduler or LRSchedule()
        self.weight_decay_on_all = weight_decay_on_all
        needs = bool(getattr(loss, "requires_teacher", False))
        if teacher == "never" and needs:
            raise ValueError("the loss needs a teacher (HyCD / KD / fd / ld) but module.teacher=never")
        self.teacher: nn.Module | None = None
        if teacher == "always" or (teacher == "auto" and needs):
            self.teacher = copy.deepcopy(self.model).to(getattr(torch, teacher_dtype))
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self._skipped: dict[int, int] = {}
        # Nothing to checkpoint: the statistics are ordinary buffers of the student's state dict, and eval mode is
        # re-imposed from this flag after every mode switch, so a resumed run behaves like an uninterrupted one.
        self.freeze_norm_stats = freeze_norm_stats
        self._frozen_norms = (
            [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if freeze_norm_stats
            else []
        )
        if freeze_norm_stats:
            log.info(
                "module.freeze_norm_stats: %d BatchNorm layer(s) of the student kept in eval mode",
                len(self._frozen_norms),
            )

    # ----- teacher bookkeeping -----
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout off, norm statistics fixed, whatever Lightning toggles
        self._fix_norm_stats()
        return self

    def _fix_norm_stats(self) -> None:
        for m in getattr(self, "_frozen_norms", ()):  # train() may run before __init__ has set it
            m.eval()  # running statistics neither used from the batch nor updated; affine parameters still trained

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The evaluation pass restores the student with ``model.train(was_training)`` (alignkit/eval/encode.py),
        # bypassing ``self.train``: re-impose eval mode on the frozen norms before every step.
        self._fix_norm_stats()

    def model_spec(self) -> dict[str, Any]:
        return self.encoder.spec

    # ----- what evaluation and export see -----
    def eval_interface(self) -> tuple[nn.Module, Callable, Callable]:
        """(model with open_clip's ``encode_image`` / ``encode_text``, tokenizer, eval preprocess).

        Every training module exposes this, so the evaluation callback and ``eval.py`` work on any workflow."""
        return self.model, self.encoder.tokenizer, self.encoder.preprocess_val

    # ----- forward -----
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return OpenCLIPEncoder.encode(self.model, images, tokens)

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        # Images in the teacher's dtype: a bfloat16 teacher under fp32 training (no autocast) would refuse fp32 input.
        t = OpenCLIPEncoder.encode(self.teacher, images.to(next(self.teacher.parameters()).dtype), tokens)
        return {f"teacher_{k}": v.float() for k, v in t.items()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.accumulation == "cache_recompute":
            from alignkit.modules.accumulation import manual_step

            return manual_step(self, batch)
        images, tokens = batch["image"], batch["text"]
        out = self(images, tokens)
        if self.teacher is not None:
            # A TeacherCache callback may have put the teacher's outputs in the batch (alignkit/features/teacher_store.py).
            cached = batch.get("teacher")
            out.update(cached if cached is not None else self.teacher_forward(images, tokens))
        out["step"] = self.global_step
        terms = self.loss(out)
        self._log_train(terms, out, batch)
        return terms["loss"]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Read the loader's skipped-sample counters on the host, before Lightning moves the batch to the device.

        They never need the accelerator: left in the batch they would be copied there and read back with a
        host synchronisation inside every step (a ~16 ms stall per step on a GPU)."""
        if isinstance(batch, dict) and "skipped" in batch and "worker" in batch:
            self._count_skipped(batch.pop("worker"), batch.pop("skipped"))
        return batch

    def _count_skipped(self, workers: Any, skipped: Any) -> None:
        # Host-side tensors (collated by the DataLoader, not yet transferred): reading them costs no device sync.
        workers = map(int, workers.numpy()) if torch.is_tensor(workers) else [workers]
        skipped = map(int, skipped.numpy()) if torch.is_tensor(skipped) else [skipped]
        for w, sk in zip(workers, skipped):
            self._skipped[w] = max(self._skipped.get(w, 0), sk)

    def _log_train(self, terms: dict, out: dict, batch: dict) -> None:
        bs = batch["image"].shape[0]
        if self.log_step(terms, out, bs):
            self.log(
                "data/skipped_samples",
                torch.tensor(float(sum(self._skipped.values())), device=terms["loss"].device),
                reduce_fx="sum",
                sync_dist=True,
                batch_size=bs,
            )
