"""Shared fixtures and the offline test environment. Plain helper functions are in helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_encoder():
    from alignkit.encoders.openclip import OpenCLIPEncoder

    torch.manual_seed(0)
    return OpenCLIPEncoder(model="alignkit-tiny-vit", pretrained=None)


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A 2-layer random BERT with all-MiniLM-L6-v2's tokenizer, saved like a hub model (reloadable by path)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from alignkit.encoders.offline import minilm_path

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
