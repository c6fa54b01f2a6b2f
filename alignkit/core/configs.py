"""Where the Hydra config tree lives: one tree for ``train.py`` and ``eval.py``."""

from __future__ import annotations

from pathlib import Path

# A checkout (or editable install) reads <repo>/configs; an installed wheel carries them as alignkit/configs.
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_DIR = str(
    _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parents[2] / "configs"
)
