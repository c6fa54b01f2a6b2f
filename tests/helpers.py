"""Plain helpers shared by test files (imported as ``helpers``; tests/ is on the path). Fixtures live in conftest.py.

Test files import this module, never conftest.py or another test file: pytest loads conftest itself, and importing it
again as a module would make a second copy of its fixtures and state.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from alignkit.core.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
# A random-init timm ViT as the vision tower of tiny frozen-encoder runs (no download).
TINY_VISION = {"kind": "timm", "model": "test_vit", "pretrained": False, "pool": "cls", "init_seed": 0}


def free_port() -> int:
    """A free TCP port on this machine for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_train(
    overrides: list[str], run_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    """Compose configs/<config_name>.yaml like the CLI would, with the output directory set to ``run_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=False)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return cfg


def synthetic_shards(out_dir: Path, n: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Write ``n`` learnable "a <colour> <shape>" pairs as webdataset shards (+ sizes.json)."""
    from alignkit.data.shards import write_shards
    from alignkit.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(transform=None, num_samples=n, image_size=32, seed=seed)
    return write_shards((ds.item(i) for i in range(n)), out_dir, samples_per_shard=per_shard, overwrite=True)


def keyed_shards(root: Path, sizes: list[int], bad: dict[str, dict] | None = None) -> list[str]:
    """Shards of ``sizes`` synthetic samples with globally unique keys ``000000000..``, plus sizes.json; returns the
    shard paths. ``bad[key]`` replaces fields of that sample (a ``None`` value drops the field)."""
    from alignkit.data.shards import image_bytes, write_tars
    from alignkit.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(transform=None, num_samples=sum(sizes), image_size=32, seed=0)

    def samples():
        for key in range(sum(sizes)):
            img, cap = ds.item(key)
            sample = {"__key__": f"{key:09d}", "jpg": image_bytes(img)[0], "txt": cap}
            sample.update((bad or {}).get(sample["__key__"], {}))
            yield {k: v for k, v in sample.items() if v is not None}

    return [str(root / name) for name in write_tars(root, samples(), per_shard=sizes)]


def uneven_shards(root: Path, sizes=(7, 13, 3, 17, 8)) -> tuple[str, int]:
    """:func:`keyed_shards` of uneven sizes (default 48 samples: 2 ranks x batch 4 -> 6 steps per rank, nothing
    dropped); returns the folder and the sample count."""
    keyed_shards(root, list(sizes))
    return str(root), sum(sizes)


# Runs in a new interpreter that never imports alignkit: open_clip alone must load the directory. It encodes fixed
# inputs and saves the embeddings for the test to compare with the model it exported.
LOADER = r"""
import sys, torch, open_clip
d, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
tok = open_clip.get_tokenizer("local-dir:" + d)
g = torch.Generator().manual_seed(1)
size = model.visual.preprocess_cfg["size"]
size = size if isinstance(size, int) else size[0]
images = torch.randn(3, 3, size, size, generator=g)
texts = ["a red square", "a dog on grass", "x"]
model.eval()
with torch.no_grad():
    res = {"image": model.encode_image(images), "text": model.encode_text(tok(texts)), "images": images,
           "tokens": tok(texts), "mean": torch.tensor(model.visual.preprocess_cfg["mean"])}
assert "alignkit" not in sys.modules
torch.save(res, out)
"""


def load_in_fresh_process(export_dir: Path, tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    """Move ``export_dir`` elsewhere, load it from another working directory in a new interpreter."""
    moved = tmp_path / "moved" / "somewhere-else"
    moved.parent.mkdir(parents=True)
    shutil.move(str(export_dir), moved)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("PYTHONPATH", None)  # nothing of alignkit on the path
    proc = subprocess.run(
        [sys.executable, str(script), str(moved), str(tmp_path / "out.pt")],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)
