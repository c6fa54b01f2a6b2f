"""Gradient accumulation that keeps every negative: cache-and-recompute ("GradCache").

Plain accumulation (Lightning's ``accumulate_grad_batches``) splits the batch *before* the loss, so an in-batch
contrastive loss sees only a micro-batch of negatives. Here, for a per-device batch of ``B`` split into micro-batches
of ``m``:

1. embed every micro-batch without autograd (activation memory of one micro-batch), keep the embeddings, the
   RNG state each micro-batch started from, and the teacher's outputs;
2. evaluate the loss on all ``B`` cached embeddings with autograd w.r.t. the embeddings (cheap: ``B x d``) and take
   ``∂L/∂z``;
3. re-run each micro-batch *with* autograd from its saved RNG state (same dropout masks as in pass 1) and
   back-propagate ``<z_i, ∂L/∂z_i>``; the loss graph itself is back-propagated together with the last micro-batch
   (its own parameters, e.g. a learnable temperature).

The gradients equal those of one big batch (tested) at ~2x the student's forward cost. Under DDP only the last
backward synchronises (the others run under ``no_sync``), so communication is that of one step; with the
cross-rank loss options the gathered batch is ``B x world`` as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

FEATURE_KEYS = ("image_features", "text_features")


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def _replay_rng(state: dict[str, Any]) -> Iterator[None]:
    devices = [torch.cuda.current_device()] if "cuda" in state else []
    with torch.random.fork_rng(devices=devices):  # the outer RNG stream is left as pass 1 left it
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        yield


def cache_recompute_backward(
    forward: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    loss_fn: Callable[[dict], dict[str, torch.Tensor]],
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch_size: int,
    *,
    extra: dict[str, Any] | None = None,
    teacher: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` on the whole batch; returns (loss terms, outputs).

    ``forward`` maps a micro-batch to the student's outputs (``image_features``, ``text_features`` and optionally a
    scalar ``logit_scale``); ``teacher`` (no grad) to the teacher's, keys prefixed ``teacher_``; ``extra`` is merged
    into the loss input (e.g. ``step``). ``backward``/``no_sync`` let Lightning's ``manual_backward`` and the
    strategy's ``block_backward_sync`` do the work under DDP.
    """
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    n = images.shape[0]
    bounds = [(s, min(s + micro_batch_size, n)) for s in range(0, n, micro_batch_size)]

    # ---- pass 1: embeddings without autograd
    cached: list[dict[str, torch.Tensor]] = []
    states = []
    teacher_out: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for s, e in bounds:
            states.append(_rng_state())
            cached.append(forward(images[s:e], tokens[s:e]))
            if teacher is not None:
                teacher_out.append(teacher(images[s:e], tokens[s:e]))

    # ---- the loss on the whole batch, with autograd w.r.t. the cached embeddings
    out: dict[str, Any] = {}
    leaves: dict[str, torch.Tensor] = {}
    for k in FEATURE_KEYS:
        leaves[k] = torch.cat([c[k] for c in cached]).detach().requires_grad_(True)
    if "logit_scale" in cached[0]:
        leaves["logit_scale"] = cached[0]["logit_scale"].detach().requires_grad_(True)
    out.update(leaves)
    for k in teacher_out[0] if teacher_out else ():
        v = [t[k] for t in teacher_out]
        out[k] = torch.cat(v) if v[0].ndim > 0 else v[0]
    out.update(extra or {})
    terms = loss_fn(out)
    grads = torch.autograd.grad(terms["loss"], list(leaves.values()), retain_graph=True, allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}

    # ---- pass 2: recompute each micro-batch with autograd and push the cached gradients through it
    for i, ((s, e), state) in enumerate(zip(bounds, states)):
        last = i == len(bounds) - 1
        with _replay_rng(state), contextlib.nullcontext() if last else no_sync():
            o = forward(images[s:e], tokens[s:e])
            surrogate = sum((o[k] * grads[k][s:e]).sum() for k in FEATURE_KEYS)
            if i == 0 and "logit_scale" in grads:  # the scale is shared by all micro-batches: count it once
                surrogate = surrogate + (o["logit_scale"] * grads["logit_scale"]).sum()
            if last:
                # The loss graph's own parameters (e.g. a learnable temperature) get their gradient here; the
                # embeddings it reaches are leaves, so nothing flows twice into the model. One synchronised
                # backward per step reaches every trainable parameter, as DDP expects.
                surrogate = surrogate + terms["loss"] - terms["loss"].detach()
            backward(surrogate)
    return terms, out


def manual_step(module, batch: dict) -> torch.Tensor:
    """AlignModule's training step under ``accumulation=cache_recompute`` (Lightning manual optimisation)."""
    opt = module.optimizers()
    opt.zero_grad(set_to_none=True)
    block = getattr(module.trainer.strategy, "block_backward_sync", None)
    terms, out = cache_recompute_backward(
        module,
        module.loss,
        batch["image"],
        batch["text"],
        module.micro_batch_size,
        extra={"step": module.global_step},
        teacher=module.teacher_forward if module.teacher is not None else None,
        backward=module.manual_backward,
        no_sync=block if block is not None else contextlib.nullcontext,
    )
    module.last_loss_terms = terms  # before the step: NonFiniteGuard names the non-finite term
    opt.step()
    sched = module.lr_schedulers()
    if sched is not None:
        sched.step()
    module._log_train(terms, out, batch)
    return terms["loss"].detach()
