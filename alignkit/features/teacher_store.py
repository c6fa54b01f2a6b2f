"""Per-sample cache of the frozen teacher's embeddings (CLIP-Refine's HyCD teacher), reused instead of recomputed.

The teacher is frozen, so with deterministic preprocessing (``data.augment=false``, the released recipe) its
embedding of a sample never changes. An entry lives in ``root/<fingerprint>/`` where the fingerprint covers
everything the embeddings depend on: the teacher's weights (a hash of every tensor's bytes), its dtype, the device
type and precision it runs under, the image preprocessing, the tokenizer and the dataset's identity (shard paths,
sizes and mtimes). Change any of them and a different entry is used, so nothing stale is ever read.

* images are keyed by the sample key (``__key__``), which is unique within one dataset identity;
* texts are keyed by their token ids, so a randomly picked caption among several still hits, and the key can never
  point at the wrong caption.

When does it pay? The teacher forward is ~1/4 of a CLIP-Refine step (student forward + backward ≈ 3 forwards).
Within a single one-epoch run every sample is seen once, so filling the cache *during* that run saves nothing;
it pays when it is filled ahead (``scripts/precompute_teacher.py``: a forward-only pass, runnable earlier or on
idle GPUs, ~3× cheaper per sample than a training step and trivially parallel), or when several runs share the
teacher and data (sweeps over λ, α, lr, seeds; repeated epochs). Each entry's part files hold fp32 rows:
(N_images + N_captions) × embed_dim × 4 bytes, e.g. COCO (118k images, 590k captions) at 512-d ≈ 1.4 GiB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.features.cache import cache_key, weights_fingerprint

log = logging.getLogger(__name__)

__all__ = ["TeacherEmbeddingStore", "dataset_identity", "teacher_fingerprint", "token_keys"]

_PROBE_TEXTS = ["a photo of a cat.", "Ünïcödé, digits 0123 and PUNCTUATION!?", ""]


def dataset_identity(datamodule: Any) -> dict[str, Any]:
    """What the sample keys of ``datamodule`` are unique within: its pair source's identity (files with sizes and
    mtimes, or generator settings; :meth:`alignkit.data.sources.PairSource.identity`)."""
    source = getattr(datamodule, "pair_source", None)
    if source is None:
        raise ValueError(
            f"teacher cache: cannot tell the identity of the data of {type(datamodule).__name__}: it has no "
            f".pair_source (use alignkit.data.ImageTextDataModule)"
        )
    return source.identity()


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    probe = tokenizer(_PROBE_TEXTS)
    probe = probe if torch.is_tensor(probe) else torch.as_tensor(probe)
    return {
        "type": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "context_length": getattr(tokenizer, "context_length", None),
        "probe": hashlib.sha256(probe.to(torch.int64).numpy().tobytes()).hexdigest(),
    }


def teacher_fingerprint(
    teacher: nn.Module,
    *,
    preprocess: Any,
    tokenizer: Any,
    dataset: dict[str, Any],
    precision: str,
    device_type: str,
) -> str:
    """SHA-256 over everything the cached embeddings depend on (see the module docstring)."""
    dtypes = sorted({str(p.dtype) for p in teacher.parameters()})
    return cache_key(
        {
            "weights": weights_fingerprint(teacher),
            "dtypes": dtypes,
            "preprocess": repr(preprocess),
            "tokenizer": _tokenizer_identity(tokenizer),
            "dataset": dataset,
            "precision": str(precision),
            "device_type": device_type,
            "format": 1,
        }
    )


def token_keys(tokens: torch.Tensor) -> list[bytes]:
    """One hashable key per row of token ids (the ids themselves: no collisions)."""
    rows = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    return [r.tobytes() for r in rows]


def _keys_to_tokens(keys: Sequence[bytes]) -> torch.Tensor:
    if not keys:
        return torch.empty(0, 0, dtype=torch.int64)
    return torch.stack([torch.frombuffer(bytearray(k), dtype=torch.int64) for k in keys])


class _Table:
    """key → row of a growable (capacity, d) fp32 tensor."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}
        self.data: torch.Tensor | None = None
        self.new_from = 0  # rows >= new_from were inserted in this process (saved as a new part)

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
        """(row per key, −1 for misses) and the positions of the misses."""
        rows = [self.index.get(k, -1) for k in keys]
        return rows, [i for i, r in enumerate(rows) if r < 0]

    def gather(self, rows: Sequence[int]) -> torch.Tensor:
        return self.data[torch.as_tensor(rows, dtype=torch.long)]

    def insert(self, keys: Sequence[Hashable], feats: torch.Tensor) -> None:
        feats = feats.detach().to("cpu", torch.float32)
        first: dict[Hashable, int] = {}
        for i, k in enumerate(keys):  # a key repeated within one call (the same caption twice) is stored once
            if k not in self.index:
                first.setdefault(k, i)
        fresh = list(first.items())
        if not fresh:
            return
        n = len(self.index)
        need = n + len(fresh)
        if self.data is None or self.data.shape[0] < need:
            cap = max(need, 2 * (0 if self.data is None else self.data.shape[0]), 1024)
            grown = torch.empty(cap, feats.shape[1], dtype=torch.float32)
            if self.data is not None:
                grown[:n] = self.data[:n]
            self.data = grown
        if feats.shape[1] != self.data.shape[1]:
            raise ValueError(
                f"teacher cache: got {feats.shape[1]}-d rows, the table holds {self.data.shape[1]}-d"
            )
        pos = torch.as_tensor([i for _, i in fresh], dtype=torch.long)
        self.data[n:need] = feats[pos]
        for j, (k, _) in enumerate(fresh):
            self.index[k] = n + j

    def rows_since(self, start: int) -> tuple[list[Hashable], torch.Tensor]:
        keys = list(self.index)[start:]
        return keys, self.data[start : start + len(keys)].clone()


class TeacherEmbeddingStore:
    """In-memory tables of teacher image / text embeddings for one fingerprint, persisted under ``root``.

    ``root=None`` keeps everything in memory (reuse across epochs of one run only). Saving writes only the rows
    added since loading, as a new part file (temp file + rename), so concurrent ranks and repeated runs never
    overwrite each other.
    """

    def __init__(self, fingerprint: str, root: str | Path | None = None) -> None:
        self.fingerprint = fingerprint
        self.dir = Path(root) / fingerprint if root is not None else None
        self.images, self.texts = _Table(), _Table()
        self.logit_scale: float | None = None
        self.hits = self.misses = 0
        if self.dir is not None and self.dir.is_dir():
            self._load()
        self.images.new_from, self.texts.new_from = len(self.images), len(self.texts)

    def _load(self) -> None:
        parts = sorted(self.dir.glob("part-*.pt"))
        for part in parts:
            try:
                blob = torch.load(part, map_location="cpu", weights_only=True)
                if blob["fingerprint"] != self.fingerprint:
                    raise ValueError("fingerprint mismatch")
            except Exception as err:  # a broken part is skipped (its rows are recomputed), never trusted
                log.warning("teacher cache part %s is unusable (%s); ignoring it", part, err)
                continue
            self.images.insert(blob["image_keys"], blob["image"])
            if blob["text_tokens"].numel():
                self.texts.insert(token_keys(blob["text_tokens"]), blob["text"])
            if blob.get("logit_scale") is not None:
                self.logit_scale = float(blob["logit_scale"])
        log.info(
            "teacher cache %s: %d image and %d text embeddings from %d part(s)",
            self.dir,
            len(self.images),
            len(self.texts),
            len(parts),
        )

    def save(self) -> Path | None:
        """Write the rows added since loading as a new part; returns its path (None if nothing new / no root)."""
        if self.dir is None:
            return None
        ik, iv = self.images.rows_since(self.images.new_from) if self.images.data is not None else ([], None)
        tk, tv = self.texts.rows_since(self.texts.new_from) if self.texts.data is not None else ([], None)
        if not ik and not tk:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"part-{uuid.uuid4().hex}.pt"
        tmp = final.with_name("." + final.name + ".tmp")
        empty = torch.empty(0, 0)
        blob = {
            "fingerprint": self.fingerprint,
            "image_keys": [str(k) for k in ik],
            "image": iv if iv is not None else empty,
            # Text keys are token-id rows: stored as one int64 tensor (weights_only loading refuses bytes).
            "text_tokens": _keys_to_tokens(tk),
            "text": tv if tv is not None else empty,
            "logit_scale": self.logit_scale,
        }
        torch.save(blob, tmp)
        os.replace(tmp, final)
        (self.dir / "fingerprint.json").write_text(json.dumps({"fingerprint": self.fingerprint}))
        self.images.new_from, self.texts.new_from = len(self.images), len(self.texts)
        log.info("teacher cache: wrote %d image / %d text rows to %s", len(ik), len(tk), final)
        return final

    def add(
        self, image_keys: Sequence[str], image_feats: torch.Tensor | None, tokens: torch.Tensor | None,
        text_feats: torch.Tensor | None, logit_scale: float | None = None,
    ) -> None:  # fmt: skip
        if image_feats is not None:
            self.images.insert(list(image_keys), image_feats)
        if text_feats is not None and tokens is not None:
            self.texts.insert(token_keys(tokens), text_feats)
        if logit_scale is not None:
            self.logit_scale = float(logit_scale)

    @torch.no_grad()
    def outputs(
        self,
        teacher: nn.Module,
        images: torch.Tensor,
        tokens: torch.Tensor,
        keys: Sequence[str],
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, torch.Tensor]:
        """The teacher's outputs for a batch, as ``AlignModule.teacher_forward`` returns them.

        Cached rows are gathered; missing rows (only those) go through the teacher in inference mode and are
        added to the cache. Rows are independent in an eval-mode ViT / text transformer, so a partial batch gives
        the same embeddings as the full one (up to the last bits of a different matmul blocking). ``context``
        is the autocast the training step runs under (the trainer's precision), so live rows match the teacher
        that ``AlignModule.teacher_forward`` would run.
        """
        img_rows, img_miss = self.images.lookup(list(keys))
        tkeys = token_keys(tokens)
        txt_rows, txt_miss = self.texts.lookup(tkeys)
        self.hits += 2 * len(keys) - len(img_miss) - len(txt_miss)
        self.misses += len(img_miss) + len(txt_miss)
        dev = images.device
        if img_miss:
            sel = torch.as_tensor(img_miss, device=dev)
            with torch.inference_mode(), context():
                x = images[sel].to(next(teacher.parameters()).dtype)
                f = teacher.encode_image(x, normalize=False).float().cpu()
            self.images.insert([keys[i] for i in img_miss], f)
            img_rows, _ = self.images.lookup(list(keys))
        if txt_miss:
            sel = torch.as_tensor(txt_miss, device=dev)
            with torch.inference_mode(), context():
                f = teacher.encode_text(tokens[sel], normalize=False).float().cpu()
            self.texts.insert([tkeys[i] for i in txt_miss], f)
            txt_rows, _ = self.texts.lookup(tkeys)
        if self.logit_scale is None and getattr(teacher, "logit_scale", None) is not None:
            self.logit_scale = float(teacher.logit_scale.exp())
        out = {
            "teacher_image_features": self.images.gather(img_rows).to(dev, non_blocking=True),
            "teacher_text_features": self.texts.gather(txt_rows).to(dev, non_blocking=True),
        }
        if self.logit_scale is not None:
            out["teacher_logit_scale"] = torch.tensor(self.logit_scale, device=dev)
        return out


@torch.no_grad()
def precompute(
    store: TeacherEmbeddingStore,
    teacher: nn.Module,
    datamodule: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, int]:
    """Fill ``store`` with the teacher's embedding of every image and every caption line of ``datamodule``.

    A forward-only pass (no student, no backward): run it ahead of training, e.g. on otherwise idle GPUs. Rows
    already in the store are skipped. Returns counts of computed rows.
    """
    pre, tok = datamodule.preprocess_val, datamodule.tokenizer
    done = {"images": 0, "texts": 0}
    img_keys: list[str] = []
    imgs: list[torch.Tensor] = []
    caps: list[str] = []

    def flush_images() -> None:
        if imgs:
            with torch.inference_mode(), context():
                x = torch.stack(imgs).to(device, next(teacher.parameters()).dtype)
                f = teacher.encode_image(x, normalize=False).float()
            store.add(img_keys, f, None, None)
            done["images"] += len(imgs)
            img_keys.clear(), imgs.clear()

    def flush_texts() -> None:
        if caps:
            tokens = tok(caps)
            keys = token_keys(tokens)
            _, miss = store.texts.lookup(keys)
            first: dict[bytes, int] = {}
            miss = [first.setdefault(keys[i], i) for i in miss if keys[i] not in first]  # each caption once
            if miss:
                sel = tokens[torch.as_tensor(miss)]
                with torch.inference_mode(), context():
                    f = teacher.encode_text(sel.to(device), normalize=False).float()
                store.add([], None, sel, f)
                done["texts"] += len(miss)
            caps.clear()

    for key, img, captions in datamodule.pair_source.samples():
        if key not in store.images.index:
            img_keys.append(key)
            imgs.append(pre(img))
        caps.extend(captions)
        if len(imgs) >= batch_size:
            flush_images()
        if len(caps) >= batch_size:
            flush_texts()
    flush_images()
    flush_texts()
    if getattr(teacher, "logit_scale", None) is not None:
        store.logit_scale = float(teacher.logit_scale.exp())
    return done
