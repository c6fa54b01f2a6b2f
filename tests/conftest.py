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
    from alignkit.run.reproduce.recipes import tiny_text_tower

    return tiny_text_tower(tmp_path_factory.mktemp("tiny_bert"))
