"""The run builder: one composed config → data node, encoder, module, trainer and batch plan, built one way.

``build_run(cfg)`` is how ``train()``, ``scripts/precompute_teacher.py``, the benchmarks and the config tests get
their objects, so all of them see the same module, the same trainer and the same steps per epoch. Order matters
and is the training entry's: data first (a bad path fails before any model is built), then the encoder, the data
node's preparation (the model's preprocessing; the frozen-encoder workflow's feature extraction and layer selection,
whose findings size the module), the module, the batch plan (its step count goes to the trainer's constructor)
and last the trainer.

What the builder relies on is written down as protocols, named after the methods the nodes already have:
:class:`DataNode` (every training data node), :class:`TakesPreprocessing` (image-text nodes),
:class:`PreparesFeatures` (frozen-encoder feature nodes), :class:`Encoder` and :class:`ExportsItself` (modules
that write their own export format).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict

from alignkit.core.status import ReportsStatus, RunStatus
from alignkit.data.batch_plan import BatchPlan
from alignkit.modules.base import TrainingModule
from alignkit.run import cluster  # also registers the ${ak_slurm:...} / ${ak_sweep_id:} resolvers
from alignkit.run.checkpointing import RunIdentity, run_identity

log = logging.getLogger(__name__)


# ----- what the builder relies on -----
@runtime_checkable
class DataNode(Protocol):
    """A training data node (``configs/data/``): a per-device batch size, an epoch size and the loader batches
    per rank and epoch for a world size (its own rounding of samples / (per device × world))."""

    batch_size: int

    def dataset_size(self) -> int: ...

    def steps_per_epoch(self, world_size: int | None = None) -> int: ...


@runtime_checkable
class TakesPreprocessing(Protocol):
    """A data node that loads raw images and captions through the model's own preprocessing and tokenizer."""

    def attach(self, preprocess_train: Callable, preprocess_val: Callable, tokenizer: Callable) -> None: ...


@runtime_checkable
class PreparesFeatures(Protocol):
    """A data node that encodes its pairs with frozen towers and picks layers before the module exists; returns
    the module's sizing keywords (``image_layer``, ``text_layer``, ``image_dim``, ``text_dim``)."""

    def prepare_features(self, encoder: Any, output_dir: str | Path | None = None) -> dict[str, Any]: ...


class Encoder(Protocol):
    """An encoder node (``configs/encoder/``) as the data nodes see it."""

    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


@runtime_checkable
class ExportsItself(Protocol):
    """A module with its own export format (else ``train()`` writes the open_clip hub layout from its state)."""

    def export_to(
        self,
        run_dir: str | Path,
        run_cfg: Mapping[str, Any] | None = None,
        history: Mapping[Any, Mapping[str, float]] | None = None,
    ) -> Any: ...


# ----- the built run -----
@dataclass
class Run:
    """Everything a composed config builds. ``plan`` is ``None`` when built with ``prepare=False``."""

    cfg: DictConfig
    run_dir: Path
    data: DataNode
    encoder: Encoder
    module: TrainingModule
    trainer: L.Trainer
    callbacks: list[Callback] = field(default_factory=list)
    loggers: list[Logger] = field(default_factory=list)
    found: dict[str, Any] = field(default_factory=dict)  # what data preparation found (selected layers, dims)
    plan: BatchPlan | None = None
    status: RunStatus = field(default_factory=RunStatus)  # what the callbacks report (alignkit.core.status)


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    return [
        instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c
    ]


def build_module(cfg: DictConfig, encoder: Encoder, **found: Any) -> TrainingModule:
    """``cfg.module`` around the built encoder with the config's loss, optimizer and schedule (+ ``found``)."""
    # Built objects go to a partial, not to instantiate(): Hydra would turn dataclasses back into configs.
    return instantiate(cfg.module, _partial_=True)(
        encoder=encoder,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        **found,
    )


def prepare_data(data: DataNode, encoder: Encoder, run_dir: Path) -> dict[str, Any]:
    """Give the data node what it needs from the encoder; returns what the module must be built with."""
    if isinstance(data, TakesPreprocessing):
        data.attach(encoder.preprocess_train, encoder.preprocess_val, encoder.tokenizer)
    if isinstance(data, PreparesFeatures):
        return data.prepare_features(encoder, run_dir)
    return {}


def plan_batches(data: DataNode, trainer_cfg: DictConfig, epochs: int) -> BatchPlan:
    """The run's batch plan: the data node's epoch for the trainer config's world size and accumulation.

    Planned before the Trainer is built, so that ``max_steps`` goes to its constructor: the world size is resolved
    from the config as Lightning will (:func:`alignkit.run.cluster.planned_world_size`), and :func:`check_plan`
    holds the built Trainer to it."""
    world = cluster.planned_world_size(trainer_cfg)
    return BatchPlan(
        per_device=int(data.batch_size),
        world_size=world,
        accumulation=int(trainer_cfg.get("accumulate_grad_batches", 1) or 1),
        samples=data.dataset_size(),
        steps_per_epoch=data.steps_per_epoch(world),
        epochs=int(epochs),
    )


def planned_max_steps(plan: BatchPlan | None, trainer_cfg: DictConfig) -> dict[str, int]:
    """The Trainer's ``max_steps`` keyword: an unset one (``-1``) becomes the plan's optimizer steps (a step-based
    schedule: one epoch = steps_per_epoch loader batches per rank; the loader ends the epoch)."""
    if plan is None or int(trainer_cfg.get("max_steps", -1)) != -1:
        return {}
    return {"max_steps": plan.optimizer_steps}


def check_plan(plan: BatchPlan, trainer: L.Trainer) -> None:
    """Fail when the built Trainer's world size or accumulation differs from what the plan assumed."""
    built = (trainer.world_size, trainer.accumulate_grad_batches)
    if built != (plan.world_size, plan.accumulation):
        raise RuntimeError(
            f"the batch plan assumed world size {plan.world_size} and accumulation {plan.accumulation} from the "
            f"trainer config, but the Trainer runs world size {built[0]} and accumulation {built[1]}: set "
            "trainer.devices / trainer.num_nodes / trainer.accumulate_grad_batches explicitly (or trainer.max_steps)"
        )


def apply_plan(plan: BatchPlan, module: TrainingModule, trainer: L.Trainer) -> None:
    """Check the plan against the built Trainer; the module logs the plan's batch sizes."""
    check_plan(plan, trainer)
    module.batch_plan = plan
    log.info(
        "%d samples, per-device batch %d, world %d, accumulation %d -> %d steps/epoch, %d optimizer steps",
        plan.samples,
        plan.per_device,
        plan.world_size,
        plan.accumulation,
        plan.steps_per_epoch,
        trainer.max_steps,
    )


def build_run(
    cfg: DictConfig,
    *,
    prepare: bool = True,
    callbacks: bool = True,
    loggers: bool = True,
    extra_callbacks: Sequence[Callback] = (),
) -> Run:
    """Build the run ``cfg`` describes (see the module docstring for the order).

    Args:
        prepare: prepare the data node (preprocessing, feature extraction, layer selection) and plan the
            batches. ``False`` only instantiates every node: what a config check needs, with no data read.
        callbacks: the config's callbacks plus the run identity written into checkpoints (``False``: none).
        loggers: the config's loggers (``False``: none).
        extra_callbacks: appended to the trainer's callbacks (e.g. a benchmark's clock).
    """
    run_dir = Path(cfg.paths.output_dir)
    data = instantiate(cfg.data)
    if not isinstance(data, DataNode):
        raise TypeError(
            f"data node {type(data).__name__} ({cfg.data.get('_target_')}) lacks batch_size, dataset_size() or "
            "steps_per_epoch(world_size): point data._target_ at a training data node (alignkit.data...)"
        )
    encoder = instantiate(cfg.encoder)
    found = prepare_data(data, encoder, run_dir) if prepare else {}
    module = build_module(cfg, encoder, **found)
    cluster.check_trainer_matches_slurm(cfg.trainer)
    cbs = [*build_callbacks(cfg), RunIdentity(run_identity(cfg))] if callbacks else []
    cbs += list(extra_callbacks)
    status = RunStatus()  # one per run: every callback that reports or reads it gets this one
    for cb in cbs:
        if isinstance(cb, ReportsStatus):
            cb.attach_status(status)
    lgs = build_loggers(cfg) if loggers else []
    plan = plan_batches(data, cfg.trainer, cfg.epochs) if prepare else None
    # the plugins are built first so the requeue owner is checked on them, with no private Trainer state
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        plugins = instantiate(trainer_cfg.pop("plugins", None))
    cluster.check_one_requeue_owner(plugins, cbs)
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        callbacks=cbs,
        logger=lgs or False,
        plugins=plugins,
        **planned_max_steps(plan, cfg.trainer),
    )
    if plan is not None:
        apply_plan(plan, module, trainer)
    return Run(cfg, run_dir, data, encoder, module, trainer, cbs, lgs, found, plan, status)
