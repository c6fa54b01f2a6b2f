"""What every alignkit training module shares: the parameters the optimizer sees, the optimizer with its
step-based LR schedule, the standard per-step logging, and checkpoints without frozen weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from alignkit.core.checkpoint import AlignkitSpec
from alignkit.data.batch_plan import BatchPlan
from alignkit.losses.common import KnowsRunLength
from alignkit.modules.compile import compile_towers
from alignkit.modules.scalar_params import (
    demote_in_state_dict,
    promote_in_state_dict,
    promote_scalar_params,
)
from alignkit.modules.schedulers import LRSchedule


def batch_modality_gap(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """‖mean(normalised image) − mean(normalised text)‖₂ on one batch (a cheap running estimate for logging)."""
    return (F.normalize(img.float(), dim=-1).mean(0) - F.normalize(txt.float(), dim=-1).mean(0)).norm()


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """open_clip's rule: no decay on biases, norms/gains (ndim < 2) and logit scales."""
    return p.ndim < 2 or "logit_scale" in name or "log_scale" in name or name.endswith(".bias")


class TrainingModule(L.LightningModule):
    """Base of the training modules. Subclasses set ``model``, ``loss``, ``optimizer_factory``, ``lr_schedule``."""

    model: nn.Module
    loss: nn.Module
    optimizer_factory: Callable[..., torch.optim.Optimizer]
    lr_schedule: LRSchedule
    weight_decay_on_all: bool = False
    # State-dict prefixes of frozen weights (a teacher, frozen towers) rebuilt from their source when the module is
    # built: never written to checkpoints, so a checkpoint holds only what training changes.
    non_checkpointed_prefixes: tuple[str, ...] = ()
    # The run's batch plan (set by alignkit.run.build.build_run); None: a plan from the batch in hand
    batch_plan: BatchPlan | None = None

    # ----- checkpoints -----
    # The workflow recorded in checkpoint["alignkit"] (alignkit.core.checkpoint.WORKFLOWS): it says what
    # model_spec() holds.
    workflow: str = ""

    def model_spec(self) -> dict[str, Any]:
        """What eval.py and export need to rebuild the trained model (``checkpoint["alignkit"]["model"]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to rebuild its model (model_spec)")

    def checkpoint_spec(self) -> AlignkitSpec:
        """What the module records about itself under ``checkpoint["alignkit"]`` (one schema for every workflow)."""
        # A frozen teacher exists only in CLIP-Refine modules (never stored; rebuilt from the starting weights).
        return AlignkitSpec(self.workflow, self.model_spec(), getattr(self, "teacher", None) is not None)

    # State-dict keys of 0-dim parameters viewed as [1] for FSDP (alignkit.modules.scalar_params)
    _promoted_scalars: tuple[str, ...] = ()

    # torch.compile keyword arguments for the towers (alignkit.modules.compile); None: eager
    compile_options: dict[str, Any] | None = None

    def configure_model(self) -> None:
        """Compile the towers (student's and teacher's) when ``module.compile.enabled``. Under FSDP, view the 0-dim parameters (``logit_scale``, ``logit_bias``, the teacher's) as ``[1]`` before
        the strategy wraps the module: FSDP refuses scalar parameters. Checkpoints keep them 0-dim."""
        from lightning.pytorch.strategies import FSDPStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            self.promote_scalar_params()
        if self.compile_options is not None and not getattr(self, "_towers_compiled", False):
            for m in (self.model, getattr(self, "teacher", None)):
                if m is not None:
                    compile_towers(m, self.compile_options)
            self._towers_compiled = True

    def promote_scalar_params(self) -> None:
        """View the 0-dim parameters as ``[1]``; a state dict loaded later (a resume, through FSDP's wrapper or not)
        has its 0-dim entries viewed as ``[1]`` by a load pre-hook."""
        first = not self._promoted_scalars
        self._promoted_scalars = tuple(promote_scalar_params(self))
        if first and self._promoted_scalars:
            self.register_load_state_dict_pre_hook(self._promote_loaded_scalars)

    def _promote_loaded_scalars(self, module, state_dict, prefix, *args) -> None:
        promote_in_state_dict(state_dict, [prefix + k for k in self._promoted_scalars])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        demote_in_state_dict(sd, self._promoted_scalars)
        for k in [k for k in sd if k.startswith(self.non_checkpointed_prefixes)]:
            del sd[k]
        checkpoint["alignkit"] = self.checkpoint_spec().section()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint holds no frozen weights: keep the ones this module was built with."""
        absent = tuple(
            p for p in self.non_checkpointed_prefixes if not any(k.startswith(p) for k in state_dict)
        )
        if absent:
            state_dict = dict(state_dict)
            state_dict.update({k: v for k, v in self.state_dict().items() if k.startswith(absent)})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----- optimisation -----
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Model parameters that require grad plus the loss's own (e.g. a learnable temperature)."""
        named = [(f"model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]
        named += [(f"loss.{n}", p) for n, p in self.loss.named_parameters() if p.requires_grad]
        return named

    def configure_optimizers(self):
        named = self.trainable_parameters()
        if not named:
            raise ValueError("no trainable parameters: everything is frozen and the loss has none")
        if self.weight_decay_on_all:
            groups = [{"params": [p for _, p in named]}]
        else:
            decay = [p for n, p in named if not no_weight_decay(n, p)]
            no_decay = [p for n, p in named if no_weight_decay(n, p)]
            groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = self.optimizer_factory(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        for (
            node
        ) in self.loss.modules():  # schedules set as a share of the run (StructureLoss.warmup_fraction)
            if isinstance(node, KnowsRunLength):
                node.set_run_steps(total)
        sched = self.lr_schedule.build(opt, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ----- logging -----
    def _logs_this_step(self) -> bool:
        """True on the steps whose metrics the loggers write (Lightning writes when (step + 1) % n == 0) and on the
        final step (so ``trainer.callback_metrics`` ends with the last step's values).

        Each ``self.log`` call costs Lightning ~1 ms of Python on CPU (it moves a result metric to the value's
        device every call); logging diagnostics on steps no logger writes made a tiny-model step ~25% slower than
        a bare loop (BENCHMARKS.md)."""
        trainer = self.trainer
        n, step = trainer.log_every_n_steps, self.global_step + 1
        return (n > 0 and step % n == 0) or (trainer.max_steps > 0 and step >= trainer.max_steps)

    def log_step(self, terms: dict, out: dict, batch_size: int) -> bool:
        """On the steps the loggers write (and the final step): ``train/loss``, every scalar term, the batch
        modality gap, the logit scale and the per-device / global batch sizes. Returns whether it was such a step.

        Nothing is logged on the other steps: no logger would write it, and Lightning's ``self.log`` costs ~1 ms of
        Python per call on CPU. The progress bar's loss therefore refreshes every ``trainer.log_every_n_steps``
        and a checkpoint ``monitor`` reads the value of the last logged step."""
        self.last_loss_terms = terms  # read by NonFiniteGuard to name a non-finite term
        if not self._logs_this_step():
            return False
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, batch_size=batch_size)
        scalars = {
            f"train/{k}": v.detach().float()
            for k, v in terms.items()
            if k != "loss" and torch.is_tensor(v) and v.ndim == 0
        }
        scalars["train/modality_gap"] = batch_modality_gap(
            out["image_features"].detach(), out["text_features"].detach()
        )
        if "logit_scale" in out:
            scalars["train/logit_scale"] = out["logit_scale"].detach().float().reshape(())
        # The run's plan (set by build_run) when there is one; else the batch in hand, scaled the same way.
        plan = self.batch_plan or BatchPlan(
            batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches
        )
        scalars.update(plan.logged())
        self.log_dict(scalars, prog_bar=False, batch_size=batch_size)
        return True
