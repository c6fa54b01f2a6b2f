"""Lightning callback that serves the frozen teacher's embeddings from a :class:`TeacherEmbeddingStore`."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from alignkit.features.teacher_store import TeacherEmbeddingStore, dataset_identity, teacher_fingerprint

log = logging.getLogger(__name__)


def fingerprint_for(trainer: L.Trainer | None, module, datamodule, device_type: str | None = None) -> str:
    """The store fingerprint of ``module``'s teacher on ``datamodule`` under ``trainer``'s precision."""
    precision = trainer.precision if trainer is not None else "32-true"
    return teacher_fingerprint(
        module.teacher,
        preprocess=datamodule.preprocess_val,
        tokenizer=datamodule.tokenizer,
        dataset=dataset_identity(datamodule),
        precision=precision,
        device_type=device_type or module.device.type,
    )


class TeacherCache(Callback):
    """Put the teacher's outputs into each batch (``batch["teacher"]``) from a per-sample cache.

    Cached rows are reused; missing rows are computed (inference mode, under the trainer's precision) and added.
    The module uses ``batch["teacher"]`` instead of running its teacher. It switches itself off, with a warning,
    when the module has no teacher or the data is augmented (``data.augment=true``: embeddings differ each time).

    Args:
        root: directory for persistent entries (reused across runs and filled ahead by
            ``scripts/precompute_teacher.py``); ``None`` keeps the cache in memory for this run only.
        save: write new rows at the end of training.
    """

    def __init__(self, root: str | None = None, save: bool = True) -> None:
        self.root = Path(root) if root else None
        self.save = save
        self.store: TeacherEmbeddingStore | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        dm = trainer.datamodule
        if getattr(pl_module, "teacher", None) is None:
            rank_zero_warn("teacher cache: the module has no teacher; the cache is off")
            return
        if dm is None or getattr(dm, "augment", True):
            rank_zero_warn(
                "teacher cache: preprocessing is random (data.augment=true) or unknown; the cache is off "
                "and the teacher runs live"
            )
            return
        fp = fingerprint_for(trainer, pl_module, dm)
        self.store = TeacherEmbeddingStore(fp, self.root)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.store is not None:
            batch["teacher"] = self.store.outputs(
                pl_module.teacher,
                batch["image"],
                batch["text"],
                batch["key"],
                context=trainer.precision_plugin.forward_context,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.store is None:
            return
        total = self.store.hits + self.store.misses
        log.info(
            "teacher cache: %d hits, %d misses (%.1f%% hit rate)",
            self.store.hits,
            self.store.misses,
            100.0 * self.store.hits / max(1, total),
        )
        if self.save:
            self.store.save()
