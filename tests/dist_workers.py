"""Functions run inside real worker processes (torch.multiprocessing spawn, gloo) by tests/test_distributed.py.

Each worker computes single-process references *before* joining the process group (the helpers in
alignkit.core.distributed are the identity then), joins, recomputes under the distributed semantics and writes what it
measured to ``out_dir/rank{r}.pt``; the test process compares.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist

B_LOCAL, DIM, IN_DIM = 4, 8, 6


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _loss_nodes():
    from alignkit.losses import (
        Alignment,
        CalibratedUniformity,
        HybridDistillation,
        InfoNCE,
        RandomFeatureAlignment,
        SoftenedInfoNCE,
        Uniformity,
    )
    from alignkit.losses.structure import StructureLoss

    return {
        "infonce_gather_local": InfoNCE(normalize=True, logit_scale="none", temperature=0.1),
        "infonce_gather_global": InfoNCE(
            normalize=True, logit_scale="none", temperature=0.1, cross_rank="gather_global_loss"
        ),
        "infonce_local": InfoNCE(normalize=True, logit_scale="none", temperature=0.1, cross_rank="local"),
        "hycd_gather_local": HybridDistillation(alpha=0.5),
        "hycd_gather_global": HybridDistillation(alpha=0.5, cross_rank="gather_global_loss"),
        "rafa": RandomFeatureAlignment(seed=3),
        # InfoNCE with global negatives (local loss) + R_S on the gathered batch
        "structure_gathered": StructureLoss(
            temperature=0.1, lambda_structure=2.0, warmup_steps=0, gather_structure=True
        ),
        # R_S on each rank's own batch (the default): checked against per-chunk references
        "structure_local_rs": StructureLoss(temperature=0.1, lambda_structure=2.0, warmup_steps=0),
        "structure_infonce_only": StructureLoss(temperature=0.1, warmup_steps=0, use_structure=False),
        "alignment": Alignment(alpha=3.0),
        # the log-mean over all pairs: exact global value/gradient from local rows (see alignkit.losses.uniformity)
        "uniformity_gather_local": Uniformity(t=2.0),
        "uniformity_union_gather_local": Uniformity(t=2.0, uniform_over="union"),
        "uniformity_gather_global": Uniformity(t=2.0, cross_rank="gather_global_loss"),
        # CM³: the frozen inputs calibrate the repulsion and travel with the features
        "cm3_gather_local": CalibratedUniformity(t=2.0),
        "cm3_per_modality_gather_global": CalibratedUniformity(
            t=1.0, combine="per_modality", cross_rank="gather_global_loss"
        ),
        # LightCLIP at step 7 of a 10-step ramp, mass to the negatives by similarity (the most row-dependent case)
        "softened_gather_local": SoftenedInfoNCE(
            max_softening=0.3, softening_steps=10, mass_to="similar", logit_scale="none", temperature=0.1
        ),
    }


def _feature_problem():
    """A shared linear 'model' (the parameter whose gradient DDP averages) over fixed inputs of the global batch."""
    g = torch.Generator().manual_seed(0)
    n = B_LOCAL * 2
    x_img, x_txt = torch.randn(n, IN_DIM, generator=g), torch.randn(n, IN_DIM, generator=g)
    w_img, w_txt = torch.randn(IN_DIM, DIM, generator=g), torch.randn(IN_DIM, DIM, generator=g)
    teacher = torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g)
    return x_img, x_txt, w_img, w_txt, teacher


def _loss_and_grads(node, x_img, x_txt, w_img, w_txt, t_img, t_txt):
    wi, wt = w_img.clone().requires_grad_(True), w_txt.clone().requires_grad_(True)
    out = {
        "image_features": x_img @ wi,
        "text_features": x_txt @ wt,
        "teacher_image_features": t_img,
        "teacher_text_features": t_txt,
        "image_inputs": x_img,  # STRUCTURE's R_S compares the head outputs with these frozen inputs
        "text_inputs": x_txt,
        "step": 7,
    }
    loss = node(out)["loss"]
    loss.backward()
    return loss.detach(), wi.grad, wt.grad


def losses_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.manual_seed(0)
    nodes = _loss_nodes()
    x_img, x_txt, w_img, w_txt, (t_img, t_txt) = _feature_problem()
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    result: dict[str, dict] = {}
    for name, node in nodes.items():  # single-process references (no process group yet)
        full = _loss_and_grads(node, x_img, x_txt, w_img, w_txt, t_img, t_txt)
        mine = _loss_and_grads(node, x_img[sl], x_txt[sl], w_img, w_txt, t_img[sl], t_txt[sl])
        result[name] = {"full": full, "local_chunk": mine}
    init_gloo(rank, world, port)
    for name, node in nodes.items():
        loss, gi, gt = _loss_and_grads(node, x_img[sl], x_txt[sl], w_img, w_txt, t_img[sl], t_txt[sl])
        for g in (gi, gt):  # what DDP does to parameter gradients: average over ranks
            dist.all_reduce(g)
            g /= world
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        result[name]["dist"] = (loss, gi, gt, mean_loss / world)
    model_result = _model_grads(rank, world)
    torch.save({"losses": result, "model": model_result}, Path(out_dir) / f"rank{rank}.pt")


def _tiny_batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 400, (n, 16), generator=g)
    return images, tokens


def _clip_refine_loss():
    from alignkit.losses import HybridDistillation, InfoNCE, RandomFeatureAlignment, WeightedLoss

    return WeightedLoss(
        weights={"rafa": 1.0, "hycd": 1.0, "contrastive": 0.5},
        rafa=RandomFeatureAlignment(seed=5),
        hycd=HybridDistillation(alpha=0.5),
        contrastive=InfoNCE(normalize=True, logit_scale="model"),
    )


class EncodeBoth(torch.nn.Module):
    """``forward`` = both towers' raw embeddings (what AlignModule.forward does), so DDP's hooks run."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        from alignkit.encoders.openclip import OpenCLIPEncoder

        return OpenCLIPEncoder.encode(self.model, images, tokens)


def tiny_step_grads(student, teacher, loss_fn, images, tokens, step: int = 3) -> torch.Tensor:
    """One loss evaluation + backward on the tiny CLIP; returns the loss (gradients stay on the student)."""
    from alignkit.encoders.openclip import OpenCLIPEncoder

    out = student(images, tokens)
    with torch.no_grad():
        t = OpenCLIPEncoder.encode(teacher, images, tokens)
    out.update({f"teacher_{k}": v for k, v in t.items()})
    out["step"] = step
    loss = loss_fn(out)["loss"]
    loss.backward()
    return loss.detach()


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _model_grads(rank: int, world: int) -> dict:
    """The shipped tiny open_clip under DDP (gloo): CLIP-Refine loss + InfoNCE, one backward."""
    from alignkit.encoders.openclip import OpenCLIPEncoder

    torch.manual_seed(0)
    student = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None).module
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():  # the student has moved away from the teacher, so HyCD has a gradient
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    images, tokens = _tiny_batch(B_LOCAL * world)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    ddp = torch.nn.parallel.DistributedDataParallel(EncodeBoth(student))
    loss = tiny_step_grads(ddp, teacher, _clip_refine_loss(), images[sl], tokens[sl])
    return {"loss": loss, "grad": _flat_grad(student)}


def tiny_reference(world: int) -> dict:
    """The same step as :func:`_model_grads` in one process on the concatenated batch."""
    from alignkit.encoders.openclip import OpenCLIPEncoder

    torch.manual_seed(0)
    student = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None).module
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    images, tokens = _tiny_batch(B_LOCAL * world)
    loss = tiny_step_grads(EncodeBoth(student), teacher, _clip_refine_loss(), images, tokens)
    return {"loss": loss, "grad": _flat_grad(student)}


class _FakeTrainer:
    def __init__(self, world: int, rank: int) -> None:
        self.world_size, self.global_rank = world, rank


def all_worker(rank: int, world: int, port: int, out_dir: str, shards: str) -> None:
    """One spawn for every check (process start-up dominates the cost): the data plan, then losses + gradients.

    The data plan runs first: its DataLoader workers are forked, and forking before gloo and the intra-op thread
    pool have started threads in this process keeps the children free of locks held by threads they do not have
    (the plan only needs the rank and world, not the process group)."""
    data_worker(rank, world, out_dir, shards, 2)
    losses_worker(rank, world, port, out_dir)
    dist.barrier()
    dist.destroy_process_group()


def data_worker(rank: int, world: int, out_dir: str, shards: str, num_workers: int) -> None:
    """Read two epochs of generated (uneven) shards as rank ``rank`` of ``world`` with ``num_workers`` workers,
    then an epoch interrupted after 3 batches and resumed by a fresh loader; record the keys per batch."""
    from alignkit.data import ImageTextDataModule
    from alignkit.encoders.openclip import OpenCLIPEncoder

    # this process was spawned; DataLoader workers are forked as in a normal run (spawning them re-imports torch)
    torch.multiprocessing.set_start_method("fork", force=True)
    enc = OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)
    result = {}
    for mode in ("exact", "resampled"):
        dm = ImageTextDataModule(
            source="webdataset",
            train_shards=shards,
            batch_size=4,
            num_workers=num_workers,
            shuffle_buffer=5,
            pin_memory=False,
            mode=mode,
            seed=11,
        )
        dm.attach(enc.preprocess_train, enc.preprocess_val, enc.tokenizer)
        dm.trainer = _FakeTrainer(world, rank)
        loader = dm.train_dataloader()
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs.append([list(b["key"]) for b in loader])
        # interrupted after 3 batches of epoch 1, resumed by a fresh loader from the saved state
        loader.set_epoch(1)
        it = iter(loader)
        head = [list(next(it)["key"]) for _ in range(3)]
        state = loader.state_dict()
        fresh = dm.train_dataloader()
        fresh.load_state_dict(state)
        fresh.set_epoch(1)
        tail = [list(b["key"]) for b in fresh]
        result[mode] = {"epochs": epochs, "resumed": head + tail, "state": state}
    torch.save(result, Path(out_dir) / f"data_rank{rank}.pt")


def nonfinite_overrides(action: str, step: int, run_dir: Path) -> list[str]:
    """The smoke run on 2 CPU processes (4 steps of 8 pairs per rank, a checkpoint after every step), with rank 1's
    loss NaN at ``step`` and every rank's parameters recorded after each step."""
    return [
        "+experiment=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "evalsets=none",
        "data.num_samples=64",
        "data.batch_size=8",
        "epochs=1",  # 64 / (8 x 2) = 4 optimizer steps
        "callbacks.checkpoint.every_n_train_steps=1",
        f"callbacks.nonfinite.action={action}",
        "+callbacks.poison._target_=run_helpers.NanLossOnRankAtStep",
        f"+callbacks.poison.step={step}",
        "+callbacks.poison.rank=1",
        "+callbacks.params._target_=run_helpers.RecordParams",
        f"+callbacks.params.dirpath={run_dir / 'params'}",
    ]


def _launched_as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun / SLURM give rank ``rank`` (Lightning launches nothing), one thread per rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)


def nonfinite_worker(rank: int, world: int, port: int, out_dir: str, step: int) -> None:
    """Rank ``rank`` of a 2-process ``train()`` started the way torchrun / SLURM start one (the environment names
    the rank; Lightning launches nothing), once with ``callbacks.nonfinite.action=stop``, then with ``skip``.
    Writes each run's summary or :class:`NonFiniteError` message to ``out_dir/rank{r}.pt``."""
    _launched_as_rank(rank, world, port)
    from helpers import compose_train

    from alignkit.callbacks.nonfinite import NonFiniteError
    from alignkit.run.train import train

    result = {}
    for action in ("stop", "skip"):
        run_dir = Path(out_dir) / action
        try:
            result[action] = {
                "summary": train(compose_train(nonfinite_overrides(action, step, run_dir), run_dir))
            }
        except NonFiniteError as e:
            result[action] = {"error": str(e)}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def syncprobe_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of a 2-process smoke run (6 steps of 8 pairs per rank, a log step every 4) with
    tests/sync_probe.SyncProbe counting alignkit's host synchronisations between log steps into ``out_dir/probe``."""
    _launched_as_rank(rank, world, port)
    from helpers import compose_train

    from alignkit.run.train import train

    out = Path(out_dir)
    overrides = [
        "+experiment=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "evalsets=none",
        "data.num_samples=96",
        "data.batch_size=8",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=4",
        "callbacks.checkpoint.every_n_train_steps=100",
        "+callbacks.sync._target_=sync_probe.SyncProbe",
        f"+callbacks.sync.out={out / 'probe'}",
    ]
    train(compose_train(overrides, out / "run"))
