"""scripts/reproduce.py: the row table, the three-way data split, the reduced offline reproduction, the recipes."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_train
from PIL import Image

from alignkit.run.reproduce.results import render_table
from alignkit.run.reproduce.rows import METRICS, ROWS, rows_for
from alignkit.run.reproduce.runner import split_metrics, val_score

REPO = Path(__file__).resolve().parent.parent


# ----- fast: the table itself -----
def test_every_row_composes_to_its_recipe(tmp_path):
    """Each row's experiment + overrides compose, and the overrides mean what the row name says."""
    for name, row in rows_for(1000).items():
        cfg = compose_train([f"+experiment={row.experiment}", *row.overrides], tmp_path)
        if name.startswith("A/last"):
            assert cfg.data.selection.mode == "last", name
        if name.startswith("A/similar"):
            assert cfg.data.selection.mode == "best", name
        if name.startswith("A/") and name.split("/")[1].split("@")[0].endswith("_rs"):
            assert cfg.loss.align.use_structure is True, name
        if cfg.loss.get("align") is not None and cfg.loss.align.get("use_structure"):
            assert cfg.loss.align.warmup_fraction == 0.25, name  # a quarter of any run, short or long
        if name.startswith("A/") and "infonce" in name:
            assert cfg.loss.align.use_structure is False, name
    b = {
        n: compose_train([f"+experiment={r.experiment}", *r.overrides])
        for n, r in ROWS.items()
        if r.part == "B"
    }
    assert b["B/hycd"].loss.weights.rafa == 0.0 and b["B/hycd"].loss.weights.hycd == 1.0
    assert b["B/rafa_beta0"].loss.rafa.beta == 0.0 and b["B/rafa_beta0"].loss.weights.rafa == 1.0
    assert b["B/self_kd"].loss.hycd.alpha == 0.0 and b["B/self_kd"].loss.weights.rafa == 0.0
    assert b["B/clip_refine"].loss.weights.rafa == 1.0 and b["B/clip_refine"].loss.hycd.alpha == 0.5
    assert dict(b["B/contrastive"].loss.weights) == {"contrastive": 1.0}
    assert dict(b["B/align_uniform"].loss.weights) == {"align": 1.0, "uniform": 1.0}
    assert b["B/lightclip"].loss.lightclip.softening_steps == 12
    assert dict(b["B/lightclip"].loss.weights) == {"lightclip": 1.0}
    cm3 = compose_train([f"+experiment={ROWS['A/last_rs_cm3'].experiment}", *ROWS["A/last_rs_cm3"].overrides])
    assert cm3.loss.weights.cm3 == 1.0 and cm3.loss.align.use_structure is True


def test_low_data_rows_are_named_by_their_pair_count():
    assert {"A/last_infonce@1000", "A/last_rs@1000"} <= set(rows_for(1000))
    assert {"A/last_infonce@100", "A/last_rs@100"} <= set(rows_for(100))
    assert not any("{" in n for n in rows_for(7))
    both = rows_for((1000, 250))
    assert both["A/last_rs@250"].low_n == 250 and both["A/last_infonce@1000"].low_n == 1000
    assert both["A/last_rs@250"].choose_lambda and not both["A/last_infonce@250"].choose_lambda


def test_every_part_b_row_runs_from_each_start_and_the_gap_start_is_declared():
    from alignkit.run.reproduce.rows import B_STARTS

    table = rows_for(1000)
    b_rows = [n for n, r in ROWS.items() if r.part == "B"]
    for key in B_STARTS:
        names = [n if not key else n.replace("B/", f"B@{key}/", 1) for n in b_rows]
        assert all(
            table[n].start == key and table[n].experiment == ROWS[b].experiment for n, b in zip(names, b_rows)
        )
        assert all(c in table and table[c].part == "A" for c in B_STARTS[key])  # candidates are Part A rows
    gap = compose_train(
        [
            f"+experiment={table['A/last_infonce_t0.005'].experiment}",
            *table["A/last_infonce_t0.005"].overrides,
        ]
    )
    assert gap.loss.align.temperature == 0.005 and gap.data.selection.mode == "last"
    assert gap.module.text_head.bias is False  # open_clip can hold it as it is
    cca_last = compose_train(
        [f"+experiment={table['A/cca_last'].experiment}", *table["A/cca_last"].overrides]
    )
    assert cca_last.data.selection.mode == "last" and cca_last.epochs == 0


def test_val_score_and_metric_names():
    m = {"zs/fashion_mnist/top1": 0.5, "ret/openclipart/i2t_r@1": 0.2, "ret/openclipart/t2i_r@1": 0.1}
    assert val_score(m) == pytest.approx(0.5 + 0.15)
    raw = {"val/zs/test_fashion_mnist/top1": 0.7, "val/zs/val_fashion_mnist/top1": 0.6, "train/loss": 1.0}
    assert split_metrics(raw, "test") == {"zs/fashion_mnist/top1": 0.7}
    assert split_metrics(raw, "val") == {"zs/fashion_mnist/top1": 0.6}


def test_render_table_mean_and_std():
    payload = {
        "rows": {"A/x": {METRICS[0]: 0.5}, "B/y": {METRICS[0]: 0.25}},
        "meta": {"std": {"A/x": {METRICS[0]: 0.01}}, "seeds": {"A/x": [0, 1, 2], "B/y": [0]}},
    }
    text = render_table(payload, METRICS)
    assert "| `A/x` | 3 | 0.500 ± 0.010 |" in text
    assert "| `B/y` | 1 | 0.250 |" in text


# ----- slow: the reduced offline reproduction (real encoders, real data) -----
def _pictures(root: Path, split: str) -> dict[str, int]:
    """pixel hash -> count over every image file of a split, read with tarfile + PIL (not the builder's code)."""
    out: dict[str, int] = {}
    for tar in sorted((root / split).rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".png"):
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    h = hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()
                    out[h] = out.get(h, 0) + 1
    return out


def _captions(root: Path, split: str) -> list[str]:
    caps = []
    for tar in sorted((root / split).rglob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".txt"):
                    caps += tf.extractfile(member).read().decode().splitlines()  # type: ignore[union-attr]
    return caps


@pytest.fixture(scope="module")
def tiny_repro(tmp_path_factory):
    from alignkit.run.reproduce.offline import run_offline

    base = tmp_path_factory.mktemp("repro")
    payload = run_offline(base / "out", "tiny", base / "data", base / "cache")
    return base, payload


@pytest.mark.slow
def test_reduced_reproduction_produces_every_row(tiny_repro):
    base, payload = tiny_repro
    assert set(payload["rows"]) == set(rows_for(100))
    for row, metrics in payload["rows"].items():
        for m in METRICS:
            assert math.isfinite(metrics[m]), (row, m)
            if not m.startswith("gap/"):
                assert 0.0 <= metrics[m] <= 1.0, (row, m)
    written = json.loads((base / "out" / "results.json").read_text())
    assert written["rows"] == payload["rows"]
    md = (base / "out" / "results.md").read_text()
    assert all(f"`{row}`" in md for row in payload["rows"])
    assert (base / "out" / "results.png").stat().st_size > 0
    # every choice was made on validation scores and picked their maximum
    for choice in payload["meta"]["choices"].values():
        scores = {str(k): v for k, v in choice["val_score"].items()}
        assert scores[str(choice["chosen"])] == max(scores.values())


@pytest.mark.slow
def test_reduced_reproduction_split_is_disjoint(tiny_repro):
    base, _ = tiny_repro
    root = base / "data"
    pics = {s: _pictures(root, s) for s in ("align", "refine", "val", "test")}
    names = list(pics)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(pics[a]) & set(pics[b]), f"{a} and {b} share pictures"
    counts = json.loads((root / "manifest.json").read_text())
    assert sum(pics["test"].values()) == counts["fashion_test"] + counts["clipart_test"]
    assert sum(pics["align"].values()) == counts["fashion_align"] + counts["clipart_align"]
    # the held-out classes are never in an alignment or refinement caption; evaluation covers all 10 classes
    for split in ("align", "refine"):
        caps = _captions(root, split)
        assert caps and not [c for c in caps if " bag" in c or "ankle boot" in c]
    classes = (root / "test" / "fashion_mnist" / "classnames.txt").read_text().split("\n")
    assert "bag" in classes and "ankle boot" in classes


@pytest.mark.slow
def test_cached_evaluation_equals_the_ordinary_evaluation(tiny_repro):
    """Part A's cached-feature evaluation gives the numbers of eval.py's path (towers + heads on images)."""
    from alignkit.data.evalsets import load_eval_set
    from alignkit.eval.encode import evaluate_sets
    from alignkit.run.evaluate import load_model

    base, payload = tiny_repro
    model_dir = base / "out" / "runs" / "A_last_infonce" / "seed0" / "model"
    loaded = load_model(ckpt=str(model_dir))
    sets = {s: load_eval_set(base / "data" / "test" / s, s) for s in ("fashion_mnist", "openclipart")}
    direct, _ = evaluate_sets(loaded.model, loaded.tokenizer, loaded.preprocess, sets, batch_size=64)
    for m in METRICS:
        assert payload["rows"]["A/last_infonce"][m] == pytest.approx(direct[m], abs=1e-4), m


@pytest.mark.slow
def test_part_b_starts_from_the_part_a_model(tiny_repro):
    """B/pretrained (the open_clip directory through the open_clip encoder node) scores what its Part A run
    scored through the frozen towers: the export is the same model."""
    from alignkit.run.reproduce.rows import B_STARTS

    _, payload = tiny_repro
    meta = payload["meta"]
    assert set(meta["b_starts"]) == {f"B@{k}" if k else "B" for k in B_STARTS}
    for label, start in meta["b_starts"].items():
        key = label.removeprefix("B").removeprefix("@")
        assert (
            start["chosen"] == meta["choices"][f"{label} start"]["chosen"]
            and start["chosen"] in B_STARTS[key]
        )
        cached, through_open_clip = start["val_cached"], meta["val"][f"{label}/pretrained"]
        for m in METRICS:
            assert through_open_clip[m] == pytest.approx(cached[m], abs=0.02), (label, m)
    assert meta["b_start_val_cached"] == meta["b_starts"]["B"]["val_cached"]  # the default start, as before


# ----- slow: the paper-scale recipes, end to end on the tiny models -----
@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,run", [("clip_refine_coco", "CLIP-Refine"), ("structure_coco", "Linear + Last")]
)
def test_recipe_dry_run(tmp_path, recipe, run):
    from alignkit.run.reproduce.recipes import run_recipe

    measured = run_recipe(recipe, tmp_path, None, None, dry_run=True)
    assert {"before training", run} <= set(measured)
    assert any(k.endswith("/top1") for k in measured[run])
    md = (tmp_path / "recipe.md").read_text()
    assert "DRY RUN" in md and ("54.69" in md if recipe == "clip_refine_coco" else "65.8" in md)
    with pytest.raises(ValueError, match="--coco-shards"):
        run_recipe(recipe, tmp_path / "real", None, str(tmp_path), dry_run=False)


def test_meta_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    """results.json records the data root relative to where reproduce ran: no machine path in the artefact."""
    from alignkit.run.reproduce.runner import relative

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "offline_repro").mkdir(parents=True)
    assert relative(tmp_path / "data" / "offline_repro") == "data/offline_repro"
    assert relative(Path("data/offline_repro")) == "data/offline_repro"
    outside = tmp_path.parent / "elsewhere"
    assert relative(outside) == str(outside)  # not under the working directory: left as given


def test_committed_results_hold_no_absolute_paths():
    """Every string in the committed replication artefacts is free of absolute machine paths."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    found = []

    def walk(o, where):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{where}/{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")
        elif isinstance(o, str) and o.startswith("/"):
            found.append((where, o))

    files = sorted(root.rglob("*.json"))
    assert files
    for f in files:
        walk(json.loads(f.read_text()), f.name)
    assert not found, found
