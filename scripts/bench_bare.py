"""The bare PyTorch loop ``bench_gpu.py`` measures alignkit against, in the same process and on the same batches.

Same open_clip model (built by alignkit's encoder node from the same config, same seed), same loss object (the
composed ``loss`` node: the same maths), a frozen deep copy as teacher for CLIP-Refine, AdamW with open_clip's
no-decay groups (``fused=True`` on CUDA, ``foreach`` elsewhere), bf16 autocast, optionally ``torch.compile`` on the
two towers' forward. No Lightning, no logging, no callbacks: what a user would write by hand."""

from __future__ import annotations

import copy
import time

import torch
from hydra.utils import instantiate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bare(
    cfg, batches: list[dict], steps: int, warmup: int, device: torch.device, compile_: bool
) -> dict:
    """Median step time, samples/s and peak memory (GiB; CUDA only, else NaN) of the hand-written loop."""
    from alignkit.encoders.openclip import OpenCLIPEncoder
    from alignkit.modules.base import no_weight_decay
    from alignkit.modules.optim import adamw

    torch.manual_seed(0)
    model = instantiate(cfg.encoder).module.to(device).train()
    loss_fn = instantiate(cfg.loss).to(device)
    teacher = None
    if getattr(loss_fn, "requires_teacher", False):  # as AlignModule's teacher=auto
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"loss.{n}", p) for n, p in loss_fn.named_parameters() if p.requires_grad]
    opt = adamw(
        [
            {"params": [p for n, p in named if not no_weight_decay(n, p)]},
            {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        ],
        lr=1e-5,
        weight_decay=0.1,
    )
    fwd = OpenCLIPEncoder.encode
    if compile_:
        fwd = torch.compile(fwd)
    bf16 = "bf16" in str(cfg.trainer.precision)

    def step(b: dict, i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(model, b["image"], b["text"])
            if teacher is not None:
                with torch.no_grad():
                    t = fwd(teacher, b["image"], b["text"])
                out.update({f"teacher_{k}": v.float() for k, v in t.items()})
            out["step"] = i
            loss = loss_fn(out)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % len(batches)], i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % len(batches)], i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    bs = batches[0]["image"].shape[0]
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": step_s, "samples_s": bs / step_s, "mem_gib": mem}
