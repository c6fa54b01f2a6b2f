"""Plain helpers shared by test files (imported as ``helpers``; tests/ is on the path). Fixtures live in conftest.py.

Test files import this module, never conftest.py or another test file: pytest loads conftest itself, and importing it
again as a module would make a second copy of its fixtures and state.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from alignkit.run.train import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
# A random-init timm ViT as the vision tower of tiny frozen-encoder runs (no download).
TINY_VISION = {"kind": "timm", "model": "test_vit", "pretrained": False, "pool": "cls", "init_seed": 0}


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


def uneven_shards(root: Path, sizes=(7, 13, 3, 17, 8)) -> tuple[str, int]:
    """Shards of uneven sizes (default 48 samples: 2 ranks x batch 4 -> 6 steps per rank, nothing dropped) with
    globally unique keys ``000000000..``, plus sizes.json."""
    import webdataset as wds

    from alignkit.data.shards import _image_bytes
    from alignkit.data.synthetic import SyntheticShapes

    root.mkdir(parents=True, exist_ok=True)
    n = sum(sizes)
    ds = SyntheticShapes(transform=None, num_samples=n, image_size=32, seed=0)
    key, names = 0, {}
    for i, s in enumerate(sizes):
        name = f"{i:05d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(s):
                img, cap = ds.item(key)
                w.write({"__key__": f"{key:09d}", "jpg": _image_bytes(img)[0], "txt": cap})
                key += 1
        names[name] = s
    (root / "sizes.json").write_text(json.dumps(names))
    return str(root), n
