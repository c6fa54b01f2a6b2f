"""Fill the teacher-embedding cache ahead of training (a forward-only pass; e.g. on otherwise idle GPUs).

    python scripts/precompute_teacher.py +experiment=clip_refine callbacks=teacher_cache data.train_shards=...

Takes the same overrides as ``train.py`` and writes to ``callbacks.teacher_cache.root``; the training run with the
same config then finds every teacher embedding in the cache (the fingerprint covers teacher weights, dtype,
precision, device type, preprocessing, tokenizer and the data files).
"""

from __future__ import annotations

import logging
import time

import hydra
import lightning as L
from omegaconf import DictConfig

from alignkit.callbacks.teacher_cache import fingerprint_for
from alignkit.core.configs import CONFIG_DIR
from alignkit.features.teacher_store import TeacherEmbeddingStore, precompute
from alignkit.run.build import build_run

log = logging.getLogger("precompute_teacher")


def run(cfg: DictConfig, batch_size: int | None = None) -> dict:
    """Fill the store for the run ``cfg`` describes; ``batch_size`` defaults to the run's per-device batch."""
    root = (cfg.get("callbacks") or {}).get("teacher_cache", {}).get("root")
    if not root:
        raise ValueError(
            "set callbacks=teacher_cache (or callbacks.teacher_cache.root=DIR): nowhere to write"
        )
    L.seed_everything(cfg.seed)
    # The training run's own data node, module and trainer (no callbacks or loggers: nothing is trained here).
    built = build_run(cfg, callbacks=False, loggers=False)
    module, datamodule, trainer, plan = built.module, built.data, built.trainer, built.plan
    if getattr(module, "teacher", None) is None:  # a frozen-encoder module has none at all
        raise ValueError("this configuration has no teacher (its loss needs none): nothing to precompute")
    device = trainer.strategy.root_device
    module.teacher.to(device)
    store = TeacherEmbeddingStore(fingerprint_for(trainer, module, datamodule, device.type), root)
    log.info(
        "teacher embeddings for %d samples (the run: %d steps/epoch of %d per device, global batch %d)",
        plan.samples,
        plan.steps_per_epoch,
        plan.per_device,
        plan.global_batch,
    )
    t0 = time.perf_counter()
    done = precompute(
        store,
        module.teacher,
        datamodule,
        batch_size=batch_size or plan.per_device,
        device=device,
        context=trainer.precision_plugin.forward_context,
    )
    store.save()
    log.info("precomputed %s in %.1fs into %s", done, time.perf_counter() - t0, store.dir)
    return {
        **done,
        "dir": str(store.dir),
        "seconds": time.perf_counter() - t0,
        "samples": plan.samples,
        "steps_per_epoch": plan.steps_per_epoch,
        "global_batch": plan.global_batch,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
