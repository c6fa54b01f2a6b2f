"""The offline replication: Part A (frozen encoders, STRUCTURE) and Part B (CLIP-Refine on the Part A model).

``run_offline(out)`` builds the data splits (:mod:`alignkit.data.offline_splits`), runs every row of
:data:`alignkit.run.reproduce.rows.ROWS` through the ordinary training entry (``alignkit.run.train.train`` on the composed
experiment + overrides, in this process), and writes ``results.json`` / ``results.md`` / ``results.png``.

Choices made on the *validation* split only (the test split is evaluated, never consulted):

* low-data Part A rows: the number of epochs (from ``Scale.low_epochs``), per row, on seed 0;
* R_S rows (``choose_lambda``): λ from ``Scale.rs_lambdas``, per row, on seed 0 (after the epochs of a low-data row);
* each Part B starting model: among its candidates in ``rows.B_STARTS`` (Part A recipes that can be written as an
  open_clip model: heads on the last layers, a bias-free text head as open_clip's HF projection is);
* the Part B learning rate: from ``Scale.b_lrs`` (the released 1e-6 first) for ``B/clip_refine``; every
  other Part B row uses the same learning rate, as CLIP-Refine's Table 1 uses one recipe for all methods.

The validation score is ``zs top-1 + (i2t R@1 + t2i R@1) / 2`` on the validation sets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignkit.data.evalsets import load_eval_set
from alignkit.data.offline_splits import ensure_offline_splits, split_overlaps
from alignkit.eval.cached import encode_cached, evaluate_export
from alignkit.run.reproduce.part_b import run_part_b
from alignkit.run.reproduce.rows import METRICS, Row, rows_for
from alignkit.run.reproduce.runner import (
    QUIET,
    SCALES,
    SETS,
    Clock,
    NotRun,
    Scale,
    compose_run,
    config_key,
    mean_std,
    relative,
    slug,
    split_metrics,
    train_run,
    val_score,
)  # fmt: skip

log = logging.getLogger(__name__)

__all__ = ["SCALES", "Scale", "run_offline", "val_score"]


def merge_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Rows of both (``new`` wins); per-row meta merged, run-level meta of each process kept under ``runs``."""
    rows = {**old["rows"], **new["rows"]}
    meta = dict(new["meta"])
    for key in ("choices", "std", "seeds", "val", "seconds", "layers", "rows", "partial", "b_starts"):
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
    clock = Clock(say)
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
        "data_root": relative(root),
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

        enc_cfg = compose_run("structure_offline", common_a, out / "runs" / "_compose").encoder
        towers = instantiate(enc_cfg)
        cache = FeatureCache(cache_dir / "features")
        t = time.monotonic()
        cached = {name: encode_cached(towers, es, cache, sc.eval_batch) for name, es in evalsets.items()}
        clock(f"eval features cached ({time.monotonic() - t:.0f} s)")

    done: dict[str, tuple[dict, dict, str]] = {}

    def run_a(name: str, row: Row, seed: int, extra: Sequence[str] = ()) -> tuple[dict, dict]:
        run_dir = out / "runs" / slug(name) / slug(f"seed{seed}" + "".join(f"-{e}" for e in extra))
        ov = [*common_a, *row.overrides, f"seed={seed}", *extra]
        if row.low_data:
            ov.append(f"data.max_pairs={row.low_n or sc.low_n[0]}")
        # A run whose composed config equals an earlier one's (A/default = A/similar_rs while the demo ships
        # that recipe; a low-data row's seed-0 run at the chosen epochs) is not trained twice.
        key = config_key(compose_run(row.experiment, ov, run_dir))
        if key in done:
            clock(f"{name} seed {seed} {' '.join(extra)}: same config as {done[key][2]}, reused")
            return done[key][0], done[key][1]
        t = time.monotonic()
        summary = train_run(row.experiment, ov, run_dir, only_finished=only_finished)
        model_dir = Path(summary["exported"]["alignkit"]).parent
        m = evaluate_export(model_dir, towers, cached)
        sel = json.loads((run_dir / "selection.json").read_text())
        clock(
            f"{name} seed {seed} {' '.join(extra)}: layers {sel['image_layer']}/{sel['text_layer']}, "
            f"{summary['global_step']} steps, {time.monotonic() - t:.0f} s; test zs "
            f"{m['zs/test_fashion_mnist/top1']:.3f} i2t {m['ret/test_openclipart/i2t_r@1']:.3f}"
        )
        va = split_metrics(m, "val") | {"_summary": summary, "_layers": sel}
        done[key] = (split_metrics(m, "test"), va, f"{name} seed {seed} {' '.join(extra)}".strip())
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
        if row.choose_lambda and len(sc.rs_lambdas) > 1:
            scores = {}
            for lam in sc.rs_lambdas:
                try:
                    va = run_a(name, row, sc.seeds[0], [*extra, f"loss.align.lambda_structure={lam:g}"])[1]
                    scores[lam] = val_score(va)
                except NotRun:
                    meta["partial"].setdefault(name, []).append(f"lambda={lam:g} not run")
            if scores:
                best_lam = max(scores, key=lambda x: scores[x])
                meta["choices"][f"{name} lambda"] = {
                    "val_score": {f"{k:g}": v for k, v in scores.items()},
                    "chosen": best_lam,
                }
                extra.append(f"loss.align.lambda_structure={best_lam:g}")
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
        results[name], meta["std"][name] = mean_std(tests)
        meta["val"][name] = mean_std(vals)[0]
        meta["seeds"][name] = ran
        meta["seconds"][name] = round(time.monotonic() - t, 1)

    # ----- Part B: CLIP-Refine on the Part A model chosen on validation -----
    b_rows = {k: r for k, r in table.items() if r.part == "B"}
    for key in sorted({r.start for r in b_rows.values()}):  # "" (the default start) first
        group = {n: r for n, r in b_rows.items() if r.start == key}
        run_part_b(
            key, group, table, results, meta, sc, root, out, cache_dir, evalsets, run_a, clock, only_finished
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
