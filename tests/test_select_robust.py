"""Layer selection that repeated captions cannot decide: the deduplicated sample and the bootstrap of the pick."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.features.select import bootstrap_scores, select_layers, selection_rows
from alignkit.features.similarity import mutual_knn_per_sample


def _templated(n_captions=12, copies=30, seed=0):
    """``n_captions`` concepts, each caption repeated ``copies`` times (a template caption set), one distinct image
    per row. Image layer 1 and text layer 1 share the concepts' geometry; image layer 0 and text layer 0 are noise.

    Returns image layers, text layers, and each row's unique image / caption id."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_captions, 6, generator=g)
    concept = torch.arange(n_captions).repeat_interleave(copies)
    n = len(concept)
    # images: every row its own picture, near its concept in layer 1
    img = [
        torch.randn(n, 10, generator=g),
        z[concept] @ torch.randn(6, 10, generator=g) + 0.3 * torch.randn(n, 10, generator=g),
    ]
    # captions: one vector per unique caption, copied to its rows (exact duplicates in every layer)
    cap = [torch.randn(n_captions, 8, generator=g), z @ torch.randn(6, 8, generator=g)]
    txt = [c[concept] for c in cap]
    return img, txt, np.arange(n), concept.numpy()


# ----- the sample -----


def test_dedup_keeps_each_image_and_caption_once_and_is_maximal():
    rng = np.random.default_rng(0)
    row_image, row_text = rng.integers(0, 40, 300), rng.integers(0, 25, 300)
    for dedup in ("images", "captions", "both"):
        rows = selection_rows(row_image, row_text, 10_000, dedup, seed=3)
        assert np.all(np.diff(rows) > 0)
        imgs, caps = row_image[rows], row_text[rows]
        if dedup in ("images", "both"):
            assert len(set(imgs)) == len(rows)
        if dedup in ("captions", "both"):
            assert len(set(caps)) == len(rows)
        # Maximal: every row left out repeats a kept image or caption (whichever the mode checks).
        for r in sorted(set(range(300)) - set(rows)):
            clash_i = dedup in ("images", "both") and row_image[r] in set(imgs)
            clash_t = dedup in ("captions", "both") and row_text[r] in set(caps)
            assert clash_i or clash_t
    # captions only: every unique caption gets exactly one row; images only: every unique image.
    assert len(selection_rows(row_image, row_text, 10_000, "captions")) == len(set(row_text))
    assert len(selection_rows(row_image, row_text, 10_000, "images")) == len(set(row_image))
    # a cap on the sample size, seeded; none = the plain seeded random subset
    assert len(selection_rows(row_image, row_text, 7, "both", seed=1)) == 7
    assert np.array_equal(
        selection_rows(row_image, row_text, 7, "both", 1), selection_rows(row_image, row_text, 7, "both", 1)
    )
    plain = selection_rows(row_image, row_text, 50, "none", seed=2)
    assert np.array_equal(plain, np.sort(np.random.default_rng(2).choice(300, 50, replace=False)))
    with pytest.raises(ValueError, match="dedup='pairs'"):
        selection_rows(row_image, row_text, 5, "pairs")


def test_duplicate_captions_tie_the_naive_kNN_and_dedup_finds_the_planted_pair():
    img, txt, row_image, row_text = _templated()
    # Naive: 30 copies per caption, k = 5, so every text neighbour set is 5 exact ties (cosine 1) -- the same
    # whatever the text layer -- and the two text layers cannot be told apart.
    naive = select_layers(img, txt, n_samples=10_000, k=5, bootstrap=500)
    ps = mutual_knn_per_sample(img, txt, k=5)
    assert torch.allclose(ps.mean(dim=2), naive.scores)
    text_gap = float((naive.scores[:, 1] - naive.scores[:, 0]).abs().max())
    assert text_gap < 0.01
    a = naive.image_layer
    assert naive.uncertainty["tied_with_pick"][a][
        1 - naive.text_layer
    ]  # the other text layer is within noise
    # Dedup: one row per caption; the caption geometry now decides, and the planted pair wins clearly.
    rows = selection_rows(row_image, row_text, 10_000, "both")
    assert len(rows) == 12
    picked = select_layers([f[rows] for f in img], [f[rows] for f in txt], k=3, bootstrap=500)
    assert (picked.image_layer, picked.text_layer) == (1, 1)
    assert picked.scores[1, 1] > picked.scores[1, 0] + 0.2
    assert picked.uncertainty["tied_with_pick"][1][0] is False


# ----- the bootstrap -----


def test_bootstrap_standard_error_matches_the_plug_in_formula():
    g = torch.Generator().manual_seed(0)
    n = 400
    x = (torch.rand(n, generator=g) < 0.3).double()  # a per-sample overlap that is 0 or 1
    per = torch.stack([x, torch.full((n,), 0.1, dtype=torch.float64)]).view(1, 2, n)
    out = bootstrap_scores(per, chosen=(0, 0), reference=(0, 1), n_boot=4000, seed=1)
    want = math.sqrt(float(((x - x.mean()) ** 2).mean()) / n)  # s.e. of a mean, plug-in variance
    assert out["std"][0][0] == pytest.approx(want, rel=0.06)
    assert out["std"][0][1] == pytest.approx(0.0, abs=1e-12)  # a constant pair has no spread
    assert out["difference"] == pytest.approx(float(x.mean()) - 0.1, abs=1e-12)
    lo, hi = out["difference_ci"]
    assert lo == pytest.approx(float(x.mean()) - 0.1 - 1.96 * want, abs=0.2 * want)
    assert hi == pytest.approx(float(x.mean()) - 0.1 + 1.96 * want, abs=0.2 * want)
    assert out["distinguishable"] is (lo > 0)


def test_bootstrap_pairs_the_difference_and_counts_picks():
    g = torch.Generator().manual_seed(2)
    n = 300
    x = torch.rand(n, generator=g, dtype=torch.float64)
    # Pair (0,0) = pair (0,1) + 0.01 on every sample: each has a wide spread, but the difference is exactly 0.01
    # in every replicate (paired), so the pick is distinguishable; pair (0,2) = pair (0,1): an exact tie.
    per = torch.stack([x + 0.01, x, x]).view(1, 3, n)
    out = bootstrap_scores(per, chosen=(0, 0), reference=(0, 1), n_boot=300, seed=0)
    assert out["std"][0][0] > 0.01
    assert out["difference_ci"] == pytest.approx([0.01, 0.01], abs=1e-12)
    assert out["distinguishable"] is True
    assert out["pick_frequency"][0] == pytest.approx([1.0, 0.0, 0.0])
    assert out["tied_with_pick"][0] == [True, False, False]
    tie = bootstrap_scores(per, chosen=(0, 1), reference=(0, 2), n_boot=300, seed=0)
    assert tie["difference_ci"] == [0.0, 0.0] and tie["distinguishable"] is False
    same = bootstrap_scores(per, chosen=(0, 1), reference=(0, 1), n_boot=50)
    assert same["distinguishable"] is False
    with pytest.raises(ValueError, match="replicates"):
        bootstrap_scores(per, (0, 0), (0, 1), n_boot=1)


def test_select_writes_uncertainty_and_warns_when_the_pick_is_within_noise_of_the_last_pair(tmp_path, caplog):
    img, txt, row_image, row_text = _templated()
    rows = selection_rows(row_image, row_text, 10_000, "both")
    img, txt = [f[rows] for f in img], [f[rows] for f in txt]
    # The last text layer is an exact copy of the first: the pick (1, 0) (first maximum) equals the last pair
    # (1, 2) on every sample, so the two cannot be told apart.
    with caplog.at_level("INFO", logger="alignkit.features.select"):
        sel = select_layers(img, [txt[1], txt[0], txt[1]], k=3, bootstrap=300, out_dir=tmp_path)
    assert (sel.image_layer, sel.text_layer) == (1, 0)
    unc = sel.uncertainty
    json.dumps(unc)  # plain types: goes to selection.json as it is
    assert unc["reference_layers"] == [1, 2] and unc["difference_ci"] == [0.0, 0.0]
    assert unc["distinguishable"] is False
    assert "NOT distinguishable from the last-layer pair" in caplog.text
    # Against a last pair that is noise, the pick is distinguishable and the log says by how much.
    caplog.clear()
    with caplog.at_level("INFO", logger="alignkit.features.select"):
        sel = select_layers(img, [txt[1], txt[0]], k=3, bootstrap=300)
    assert sel.uncertainty["distinguishable"] is True and "beats the last-layer pair" in caplog.text
    rows_csv = (tmp_path / "layer_scores.csv").read_text().splitlines()
    assert rows_csv[0].split(",")[-3:] == ["bootstrap_std", "pick_frequency", "tied_with_pick"]
    assert len(rows_csv) == 1 + 2 * 3
    assert (tmp_path / "layer_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_datamodule_refuses_unknown_dedup_and_a_sample_too_small_for_k(tmp_path):
    from alignkit.data.features import FeaturePairDataModule
    from alignkit.features.layer_choice import check_sample

    with pytest.raises(ValueError, match=r"data\.selection\.dedup='pairs'"):
        FeaturePairDataModule(source="synthetic", cache_dir=str(tmp_path), selection={"dedup": "pairs"})
    with pytest.raises(ValueError, match=r"sample has 4 pairs after data\.selection\.dedup=both"):
        check_sample(4, 100, {"dedup": "both", "k": 5, "n_samples": 50})
    check_sample(6, 100, {"dedup": "both", "k": 5, "n_samples": 50})  # k < n: fine


def test_demo_default_is_the_validated_recipe_and_the_paper_recipe_is_one_experiment_away():
    from helpers import compose_train
    from omegaconf import OmegaConf

    def plain(name):
        d = OmegaConf.to_container(compose_train([f"+experiment={name}"]), resolve=False)
        d.pop("task_name")
        return d

    # make demo = last layers + InfoNCE, the baseline it is compared with (chosen on validation, README), except
    # that the demo's text head is bias-free (so that it exports to open_clip) while the table row keeps the bias
    # it was measured with
    demo, row = plain("structure_offline"), plain("structure_offline_last_infonce")
    assert demo["module"]["text_head"]["bias"] is False and row["module"]["text_head"]["bias"] is True
    row["module"]["text_head"]["bias"] = False
    assert demo == row
    select, noselect = plain("structure_offline_select"), plain("structure_offline_noselect")
    assert select["data"]["selection"]["mode"] == "best" and select["data"]["selection"]["dedup"] == "both"
    assert select["loss"]["align"]["use_structure"] and noselect["loss"]["align"]["use_structure"]
    assert noselect["data"]["selection"]["mode"] == "last"
    # the validation sets are evaluated in every offline run, next to the eval sets
    assert {"fashion_mnist_val", "openclipart_val"} <= set(select["evalsets"])
