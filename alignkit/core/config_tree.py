"""The composed run config as a rich tree on the console when a run starts (as lightning-hydra-template's
``print_config_tree`` does); ``print_config=false`` silences it."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# shown first, in this order; the other top-level keys follow in config order
FIRST = ("experiment", "task_name", "encoder", "model", "data", "loss", "optimizer", "scheduler", "trainer")


@rank_zero_only
def print_config_tree(cfg: DictConfig, first: Sequence[str] = FIRST) -> None:
    """One branch per top-level key (its YAML), on rank zero only, unless ``cfg.print_config`` is false."""
    if not cfg.get("print_config", True):
        return
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in first if k in cfg] + [k for k in cfg if k not in first and k != "print_config"]
    for key in keys:
        node = cfg[key]
        try:
            text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        except Exception:  # an interpolation only a later step can resolve: show it as written
            text = OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else str(node)
        tree.add(str(key), style="bold").add(Syntax(text.rstrip("\n"), "yaml"))
    rich.print(tree)
