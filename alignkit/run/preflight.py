"""Start-up checks of a composed config, before any data or model is loaded: a bad setting fails in seconds,
naming the key, instead of after the model is built (a TypeError deep in Lightning) or after the whole run has
trained (an unwritable cache found in ``on_train_end``).

* :func:`check_types`: every value given to a ``_target_`` constructor matches that constructor's annotation
  (``trainer.max_steps=abc`` → "trainer.max_steps='abc' is not int").
* :func:`check_values`: no NaN / infinity anywhere; numeric keys hold numbers; loss weights ≥ 0, temperatures and
  learning rates > 0, epochs ≥ 1, std / weight decay / workers ≥ 0, HyCD alpha and probabilities in [0, 1].
* :func:`check_writable`: every directory the run writes (run dir, checkpoints, caches) is created and a file is
  written and removed in it.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# Config groups that build objects; ``hydra`` / ``paths`` hold no constructor arguments.
CHECKED_GROUPS = (
    "data",
    "encoder",
    "loss",
    "optimizer",
    "scheduler",
    "module",
    "trainer",
    "callbacks",
    "logger",
)
# (config key, what the run writes there): directories probed for writing before anything is loaded.
WRITTEN_DIRS = (
    ("paths.log_dir", "the log"),
    ("paths.output_dir", "the run directory"),
    ("callbacks.checkpoint.dirpath", "checkpoints"),
    ("callbacks.teacher_cache.root", "the teacher cache"),
    ("data.cache_dir", "the feature cache"),
)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key and what to do."""


def preflight(cfg: DictConfig) -> None:
    """All start-up checks; raises :class:`ConfigError` listing every problem found.

    Directories are probed first: that needs no import, while the type check imports every ``_target_`` (the
    imports a run makes anyway, but tens of seconds on a loaded machine)."""
    check_writable(cfg)
    problems = check_values(cfg) + check_types(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# ----- types -----
def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (a plain config value) fits ``annotation``; anything not understood is accepted."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # containers, callables, classes: the constructor checks them


def _signature_hints(target: str) -> tuple[dict[str, Any], bool] | None:
    """(annotations of the constructor's parameters, whether it takes ``**kwargs``), or None if unknown."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        params = inspect.signature(fn).parameters
        hints = typing.get_type_hints(fn)
    except Exception:  # unimportable here, C extension, unresolvable forward reference: not ours to judge
        return None
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {n: hints.get(n, inspect.Parameter.empty) for n in params if n != "self"}, var_kw


def _value(node: DictConfig, key: str) -> tuple[bool, Any]:
    try:
        v = node[key]
    except Exception:  # an interpolation that only resolves inside the Hydra app (e.g. ${hydra:...})
        return False, None
    if isinstance(v, DictConfig | ListConfig):
        return False, None
    return True, v


def check_types(cfg: DictConfig) -> list[str]:
    problems: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, ListConfig):
            for i, item in enumerate(node):
                visit(item, f"{path}[{i}]")
            return
        if not isinstance(node, DictConfig):
            return
        target = node.get("_target_") if "_target_" in node else None
        sig = _signature_hints(str(target)) if target else None
        for key in node:
            key = str(key)
            if key.startswith("_"):
                continue
            child = node._get_node(key)
            if sig is not None and not isinstance(child, DictConfig | ListConfig):
                hints, _ = sig
                ok, v = _value(node, key)
                if ok and key in hints and v != "???" and not _accepts(hints[key], v):
                    want = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
                    problems.append(f"{path}.{key}={v!r} is not {want} (check the override for {path}.{key})")
            visit(node.get(key) if isinstance(child, DictConfig | ListConfig) else None, f"{path}.{key}")

    for group in CHECKED_GROUPS:
        if group in cfg and cfg[group] is not None:
            visit(cfg[group], group)
    return problems


# ----- values -----
def _leaves(node: Any, path: str):
    if isinstance(node, DictConfig):
        for key in node:
            if str(key).startswith("_"):
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig | ListConfig):
                yield from _leaves(node[key], f"{path}.{key}")
            else:
                ok, v = _value(node, str(key))
                if ok:
                    yield f"{path}.{key}", str(key), v
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig):
                yield from _leaves(node[i], f"{path}[{i}]")
            else:
                try:
                    yield f"{path}[{i}]", "", node[i]
                except Exception:
                    continue


# Keys that always hold a number (an annotation such as ``float | Tensor`` lets a string through check_types).
NUMERIC_KEYS = frozenset(
    [
        "lr",
        "weight_decay",
        "eps",
        "momentum",
        "temperature",
        "tau",
        "structure_tau",
        "init_logit_scale",
        "std",
        "alpha",
        "beta",
        "dropout",
        "num_workers",
        "batch_size",
    ]
)
PROBABILITY_KEYS = frozenset(["p", "prob", "probability", "dropout"])


def _range_problem(group: str, path: str, key: str, v: float) -> str | None:
    if key in ("weight_decay", "num_workers", "std") and v < 0:
        return f"{path}={v} must be >= 0"
    if group == "loss" and key == "alpha" and ".hycd." in f"{path}." and not 0 <= v <= 1:
        return f"{path}={v}: HyCD's mixing weight must be in [0, 1]"
    if (key in PROBABILITY_KEYS or key.endswith("_prob")) and not 0 <= v <= 1:
        return f"{path}={v} is a probability: it must be in [0, 1]"
    return None


def check_values(cfg: DictConfig) -> list[str]:
    """Numbers that would train garbage: NaN / ±inf anywhere, a string where a number belongs, negative loss
    weights, non-positive temperatures and learning rates, ``epochs`` < 1, negative std / weight decay / workers,
    HyCD's alpha and probabilities outside [0, 1]."""
    problems: list[str] = []
    epochs = cfg.get("epochs") if "epochs" in cfg else 1
    analytic = OmegaConf.select(cfg, "module.head_init", default=None) == "cca"  # epochs=0: training-free CCA
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < (0 if analytic else 1):
        problems.append(
            f"epochs={epochs!r} must be an integer >= 1 (0 only with module.head_init=cca, the training-free "
            f"baseline): with 0 steps the run would export an untrained model"
        )
    for group in CHECKED_GROUPS:
        if group not in cfg or cfg[group] is None:
            continue
        for path, key, v in _leaves(cfg[group], group):
            numeric = key in NUMERIC_KEYS or (group == "loss" and ".weights." in f"{path}.")
            if numeric and isinstance(v, str) and v != "???":
                problems.append(f"{path}={v!r} is not a number (check the override for {path})")
                continue
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if math.isfinite(v) and (problem := _range_problem(group, path, key, v)):
                problems.append(problem)
                continue
            if not math.isfinite(v):
                problems.append(f"{path}={v} is not a finite number")
            elif group == "loss" and ".weights." in f"{path}." and v < 0:
                problems.append(f"{path}={v}: loss weights must be >= 0 (0 switches the term off)")
            elif key in ("temperature", "tau", "structure_tau", "init_logit_scale") and v <= 0:
                problems.append(f"{path}={v} must be > 0")
            elif group == "optimizer" and key == "lr" and v <= 0:
                problems.append(f"{path}={v}: the learning rate must be > 0")
    return problems


# ----- directories -----
def probe_writable(directory: str | Path, what: str, key: str) -> None:
    """Create ``directory`` (and parents) and write + delete a file in it; :class:`ConfigError` naming ``key``."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".alignkit-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{what} directory {str(d)!r} ({key}) is not writable: {type(err).__name__}: {err}. "
            f"Set {key} to a writable directory"
        ) from err


def check_writable(cfg: DictConfig) -> list[str]:
    """Probe every directory of :data:`WRITTEN_DIRS` the config sets; returns the probed keys."""
    probed = []
    for key, what in WRITTEN_DIRS:
        try:
            v = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:
            v = None
        if v in (None, "", "???") or not isinstance(v, str) or "://" in v:
            continue
        probe_writable(v, what, key)
        probed.append(key)
    log.debug("writable: %s", probed)
    return probed


class ProbeLogDir:
    """Hydra callback (``hydra.callbacks.probe_log_dir`` in the train / eval configs): probe ``paths.log_dir``
    before Hydra creates the run directory under it, so an unwritable one from the command line stops with the
    same :class:`ConfigError` as :func:`preflight` (naming the key and the fix) instead of Hydra's bare OSError
    from its own ``mkdir``. A Hydra ``Callback`` by duck typing (``on_run_start`` / ``on_multirun_start``): Hydra
    calls the hooks it finds, and this module need not import Hydra's experimental callback class. Hydra 1.3 turns
    an exception of a callback into a warning and goes on (to its own mkdir), so the message is printed here, the
    way Hydra prints a failed job's error, and the process exits with status 1 like any failed run."""

    def _probe(self, config: DictConfig) -> None:
        try:
            log_dir = OmegaConf.select(config, "paths.log_dir", default=None, throw_on_missing=False)
        except Exception:  # an unresolvable value is preflight's to report, with every other problem
            return
        if isinstance(log_dir, str) and log_dir and "://" not in log_dir:
            try:
                probe_writable(log_dir, "the log", "paths.log_dir")
            except ConfigError as err:
                print(f"{type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr, flush=True)
                raise SystemExit(1) from err

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._probe(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._probe(config)
