"""The offline replication: Part A (frozen encoders, STRUCTURE) and Part B (CLIP-Refine on the Part A model).

``run_offline(out)`` builds the data splits (:mod:`alignkit.data.offline_splits`), runs every row of
:data:`alignkit.run.reproduce.rows.ROWS` through the ordinary training entry (``alignkit.run.train.train`` on the composed
experiment + overrides, in this process), and writes ``results.json`` / ``results.md`` / ``results.png``.

Choices made on the *validation* split only (the test split is evaluated, never consulted):

* low-data Part A rows: the number of epochs (from ``Scale.low_epochs``), per row, on seed 0;
* the Part B starting model: among the Part A recipes that can be written as an open_clip model (heads on the
  last layers: ``A/last_infonce``, ``A/last_rs``, with a bias-free text head as open_clip's HF projection is);
* the Part B learning rate: from ``Scale.b_lrs`` (the released 1e-6 first) for ``B/clip_refine``; every
  other Part B row uses the same learning rate, as CLIP-Refine's Table 1 uses one recipe for all methods.

The validation score is ``zs top-1 + (i2t R@1 + t2i R@1) / 2`` on the validation sets.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from alignkit.data.evalsets import load_eval_set
from alignkit.data.offline_splits import ensure_offline_splits, split_overlaps
from alignkit.eval.cached import encode_cached, evaluate_export
from alignkit.run.reproduce.rows import METRICS, Row, rows_for

log = logging.getLogger(__name__)

__all__ = ["SCALES", "Scale", "run_offline", "val_score"]

SETS = ("fashion_mnist", "openclipart")
# Every run of the table: fresh (no resume), no checkpoints, no progress bar (the runner prints progress).
QUIET = (
    "ckpt_path=null",
    "~callbacks.checkpoint",
    "~callbacks.progress",
    "~callbacks.preemption",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
)


@dataclass(frozen=True)
class Scale:
    """Sizes and grids of one reproduction (``full``: the README table; ``tiny``: the test suite's)."""

    splits: dict[str, int]
    seeds: tuple[int, ...] = (0, 1, 2)
    low_n: int = 1000
    low_epochs: tuple[int, ...] = (20, 100)
    a_overrides: tuple[str, ...] = ()
    b_batch: int = 64
    b_lrs: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    b_overrides: tuple[str, ...] = ()
    eval_batch: int = 128
    extra: dict[str, Any] = field(default_factory=dict)


SCALES = {
    "full": Scale(
        splits=dict(fashion_align=3000, fashion_refine=400, fashion_val=500, fashion_test=1000,
                    clipart_align=2000, clipart_refine=400, clipart_val=300, clipart_test=500),
        low_epochs=(20, 100),
    ),
    "tiny": Scale(
        splits=dict(fashion_align=160, fashion_refine=40, fashion_val=60, fashion_test=100,
                    clipart_align=100, clipart_refine=24, clipart_val=40, clipart_test=50),
        seeds=(0,), low_n=100, low_epochs=(2, 4), b_batch=32, b_lrs=(1e-5,),
        a_overrides=("data.batch_size=64", "data.selection.n_samples=200",
                     "loss.align.warmup_steps=5"),
    ),
}  # fmt: skip


def val_score(m: Mapping[str, float]) -> float:
    """The one number every validation choice maximises (module docstring)."""
    return m["zs/fashion_mnist/top1"] + (m["ret/openclipart/i2t_r@1"] + m["ret/openclipart/t2i_r@1"]) / 2


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", row)


class _Clock:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.t0, self.say = time.monotonic(), say

    def __call__(self, msg: str) -> None:
        s = time.monotonic() - self.t0
        self.say(f"[{int(s) // 60:02d}:{int(s) % 60:02d}] {msg}")


def _compose(experiment: str, overrides: Sequence[str], run_dir: Path):
    from hydra import compose, initialize_config_dir

    from alignkit.run.train import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train", overrides=[f"+experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _train(
    experiment: str,
    overrides: Sequence[str],
    run_dir: Path,
    evalsets: dict | None = None,
    encoder_patch: Mapping[str, Any] | None = None,
    resume: bool = True,
    only_finished: bool = False,
) -> dict:
    """``alignkit.run.train.train`` on ``+experiment=EXPERIMENT`` + overrides in ``run_dir``; ``evalsets`` /
    ``encoder_patch`` set config values that are awkward as override strings (dicts of eval-set nodes).
    ``resume``: a run directory that holds a finished run with the same settings is reused, not retrained
    (an interrupted reproduction picks up where it stopped). ``only_finished``: raise :class:`NotRun` instead
    of training."""
    from alignkit.run.train import train

    cfg = _compose(experiment, overrides, run_dir)
    with open_dict(cfg):
        if evalsets is not None:
            cfg.evalsets = OmegaConf.create(evalsets)
        for k, v in (encoder_patch or {}).items():
            cfg.encoder[k] = v
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = f"+experiment={experiment}\n" + "\n".join(overrides) + "\n"
    if evalsets is not None or encoder_patch is not None:
        spec += (
            json.dumps({"evalsets": evalsets, "encoder": encoder_patch}, sort_keys=True, default=str) + "\n"
        )
    done = run_dir / "summary.json"
    previous = run_dir / "overrides.txt"
    if resume and done.is_file() and previous.is_file() and previous.read_text() == spec:
        return json.loads(done.read_text())  # finished earlier with the very same settings
    if only_finished:
        raise NotRun(str(run_dir))
    done.unlink(missing_ok=True)  # written by train() at the end: its presence marks a finished run
    (run_dir / "overrides.txt").write_text(spec)
    return train(cfg)


class NotRun(RuntimeError):
    """A run that has not finished, met in ``only_finished`` mode."""


def _config_key(cfg: Any) -> str:
    """The composed config minus where it is written: equal keys train the same model."""
    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("task_name", None)
    c.get("paths", {}).pop("output_dir", None)
    return json.dumps(c, sort_keys=True, default=str)


def _mean_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = sorted(set.intersection(*(set(r) for r in runs)))
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def _split(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    """``val/zs/test_fashion_mnist/top1`` -> ``zs/fashion_mnist/top1`` for the sets of one split."""
    out = {}
    for k, v in metrics.items():
        parts = k.removeprefix("val/").split("/")
        if len(parts) == 3 and parts[1].startswith(prefix + "_"):
            out[f"{parts[0]}/{parts[1].removeprefix(prefix + '_')}/{parts[2]}"] = float(v)
    return out


def _relative(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it, else as given (never made absolute)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def merge_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Rows of both (``new`` wins); per-row meta merged, run-level meta of each process kept under ``runs``."""
    rows = {**old["rows"], **new["rows"]}
    meta = dict(new["meta"])
    for key in ("choices", "std", "seeds", "val", "seconds", "layers", "rows", "partial"):
        meta[key] = {**old["meta"].get(key, {}), **new["meta"].get(key, {})}
    for key in ("b_start_dir", "b_start_val_cached"):
        if key in old["meta"] and key not in meta:
            meta[key] = old["meta"][key]
    runs = [*old["meta"].get("runs", [old["meta"]]), new["meta"]]
    meta["runs"] = [{k: r.get(k) for k in ("total_seconds", "cpu_seconds", "parts")} for r in runs]
    meta["total_seconds"] = sum(r["total_seconds"] or 0 for r in meta["runs"])
    meta["cpu_seconds"] = sum(r["cpu_seconds"] or 0 for r in meta["runs"])
    return {"rows": rows, "meta": meta}


def run_offline(
    out: str | Path,
    scale: str | Scale = "full",
    data_root: str | Path = "data/offline_repro",
    cache_dir: str | Path = ".cache/alignkit",
    rows: Mapping[str, Row] | None = None,
    say: Callable[[str], None] = log.info,
    merge: bool = False,
    only_finished: bool = False,
) -> dict[str, Any]:
    """Run the reproduction into ``out`` (module docstring); returns the results dict written to results.json.

    ``merge``: add these rows to an existing ``out/results.json`` (parts run as separate processes).
    ``only_finished``: train nothing; assemble the table from the runs already finished in ``out`` (rows with
    fewer seeds or grid points than asked say so in ``meta.partial``; rows with none are left out)."""
    from alignkit.features.cache import FeatureCache
    from alignkit.run.reproduce.results import write_results

    sc = SCALES[scale] if isinstance(scale, str) else scale
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one line per run from the runner instead
    out, cache_dir = Path(out), Path(cache_dir).resolve()
    table = dict(rows or rows_for(sc.low_n))
    clock = _Clock(say)
    clock(f"data splits -> {data_root}")
    root = ensure_offline_splits(data_root, **sc.splits).resolve()
    overlaps = split_overlaps(root)
    if any(overlaps.values()):
        raise RuntimeError(f"the data splits share images: {overlaps}")
    clock(f"splits disjoint (pictures shared by split pairs: {overlaps})")
    evalsets = {
        f"{sp}_{s}": load_eval_set(root / sp / s, f"{sp}_{s}") for sp in ("val", "test") for s in SETS
    }
    meta: dict[str, Any] = {
        "parts": sorted({r.part for r in table.values()}),
        "scale": asdict(sc) | {"name": scale if isinstance(scale, str) else "custom"},
        # relative to the working directory (the repo root under `make reproduce`): no machine path in artefacts
        "data_root": _relative(root),
        "split_counts": json.loads((root / "splits.json").read_text()),
        "split_overlaps": overlaps,
        "rows": {k: asdict(v) for k, v in table.items()},
        "choices": {},
        "std": {},
        "seeds": {},
        "val": {},
        "seconds": {},
        "partial": {},
    }
    for v in meta["split_counts"].values():
        v.pop("pixel_sha256", None), v.pop("images", None)
    results: dict[str, dict[str, float]] = {}

    # ----- Part A: frozen towers, heads trained on cached features, evaluated on cached eval features -----
    a_rows = {k: r for k, r in table.items() if r.part == "A"}
    common_a = [
        f"data.train_shards={root / 'align'}", "data.prepare=null", f"paths.cache_dir={cache_dir}",
        "encoder._target_=alignkit.eval.cached.shared_towers", "~callbacks.evaluation",
        *QUIET, *sc.a_overrides,
    ]  # fmt: skip
    if a_rows or any(r.part == "B" for r in table.values()):
        from hydra.utils import instantiate

        enc_cfg = _compose("structure_offline", common_a, out / "runs" / "_compose").encoder
        towers = instantiate(enc_cfg)
        cache = FeatureCache(cache_dir / "features")
        t = time.monotonic()
        cached = {name: encode_cached(towers, es, cache, sc.eval_batch) for name, es in evalsets.items()}
        clock(f"eval features cached ({time.monotonic() - t:.0f} s)")

    done: dict[str, tuple[dict, dict, str]] = {}

    def run_a(name: str, row: Row, seed: int, extra: Sequence[str] = ()) -> tuple[dict, dict]:
        run_dir = out / "runs" / _slug(name) / _slug(f"seed{seed}" + "".join(f"-{e}" for e in extra))
        ov = [*common_a, *row.overrides, f"seed={seed}", *extra]
        if row.low_data:
            ov.append(f"data.max_pairs={sc.low_n}")
        # A run whose composed config equals an earlier one's (A/default = A/similar_rs while the demo ships
        # that recipe; a low-data row's seed-0 run at the chosen epochs) is not trained twice.
        key = _config_key(_compose(row.experiment, ov, run_dir))
        if key in done:
            clock(f"{name} seed {seed} {' '.join(extra)}: same config as {done[key][2]}, reused")
            return done[key][0], done[key][1]
        t = time.monotonic()
        summary = _train(row.experiment, ov, run_dir, only_finished=only_finished)
        model_dir = Path(summary["exported"]["alignkit"]).parent
        m = evaluate_export(model_dir, towers, cached)
        sel = json.loads((run_dir / "selection.json").read_text())
        clock(
            f"{name} seed {seed} {' '.join(extra)}: layers {sel['image_layer']}/{sel['text_layer']}, "
            f"{summary['global_step']} steps, {time.monotonic() - t:.0f} s; test zs "
            f"{m['zs/test_fashion_mnist/top1']:.3f} i2t {m['ret/test_openclipart/i2t_r@1']:.3f}"
        )
        va = _split(m, "val") | {"_summary": summary, "_layers": sel}
        done[key] = (_split(m, "test"), va, f"{name} seed {seed} {' '.join(extra)}".strip())
        return done[key][0], va

    for name, row in a_rows.items():
        t = time.monotonic()
        extra: list[str] = []
        if row.low_data:
            scores = {}
            for ep in sc.low_epochs:
                try:
                    scores[ep] = val_score(run_a(name, row, sc.seeds[0], [f"epochs={ep}"])[1])
                except NotRun:
                    meta["partial"].setdefault(name, []).append(f"epochs={ep} not run")
            if not scores:
                continue
            best = max(scores, key=lambda e: scores[e])
            meta["choices"][f"{name} epochs"] = {"val_score": scores, "chosen": best}
            extra = [f"epochs={best}"]
        seeds = sc.seeds[:1] if row.experiment.endswith("_cca") else sc.seeds  # CCA is deterministic
        tests, vals, ran = [], [], []
        for s in seeds:
            try:
                te, va = run_a(name, row, s, extra)
            except NotRun:
                meta["partial"].setdefault(name, []).append(f"seed {s} not run")
                continue
            tests.append(te)
            ran.append(s)
            vals.append({k: v for k, v in va.items() if not k.startswith("_")})
            meta.setdefault("layers", {})[name] = [va["_layers"]["image_layer"], va["_layers"]["text_layer"]]
        if not tests:
            continue
        results[name], meta["std"][name] = _mean_std(tests)
        meta["val"][name] = _mean_std(vals)[0]
        meta["seeds"][name] = ran
        meta["seconds"][name] = round(time.monotonic() - t, 1)

    # ----- Part B: CLIP-Refine on the Part A model chosen on validation -----
    b_rows = {k: r for k, r in table.items() if r.part == "B"}
    if b_rows:
        from alignkit.run.reproduce.part_b import run_part_b

        run_part_b(
            b_rows, table, results, meta, sc, root, out, cache_dir, evalsets, run_a, clock, only_finished
        )
    meta["total_seconds"] = round(time.monotonic() - clock.t0, 1)
    # CPU seconds of this process (all its threads): the machine-load-independent half of the cost.
    meta["cpu_seconds"] = round(time.process_time(), 1)
    payload = {"rows": results, "meta": meta}
    if merge and (out / "results.json").is_file():
        payload = merge_results(json.loads((out / "results.json").read_text()), payload)
    write_results(out, payload, METRICS)
    clock(f"wrote {out / 'results.json'}, results.md, results.png")
    return payload
