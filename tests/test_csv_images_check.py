"""A CSV source whose images do not open fails at construction, before any model is built, naming the CSV, the
paths it tried and the fix; one good image among the first 8 rows is enough."""

from __future__ import annotations

import time

import pytest
from helpers import compose_train
from PIL import Image

from alignkit.data.sources import CsvSource
from alignkit.run.train import train


@pytest.fixture
def no_model(monkeypatch):
    """Building the encoder fails loudly: a check that passes with this fixture ran before any model was built."""
    from alignkit.encoders.openclip import OpenCLIPEncoder

    def refuse(self, *a, **k):
        raise AssertionError("a model was built before the CSV's images were checked")

    monkeypatch.setattr(OpenCLIPEncoder, "__init__", refuse)


def _csv(tmp_path, images: list[str]):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n" + "".join(f"{im},a red square\n" for im in images))
    return path


def test_csv_with_all_images_missing_fails_before_the_model(tmp_path, no_model):
    csv = _csv(tmp_path, [f"img/{i}.jpg" for i in range(20)])
    cfg = compose_train(["+experiment=smoke", "data=csv", f"data.train_csv={csv}"], tmp_path / "run")
    start = time.monotonic()
    with pytest.raises(Exception) as err:
        train(cfg)
    msg = str(err.value)
    assert "a model was built" not in msg, msg  # the no_model fixture: the encoder was being built
    assert time.monotonic() - start < 10
    assert str(csv) in msg and "none of the images of its first 8 row(s) opens" in msg
    assert str(tmp_path / "img" / "0.jpg") in msg  # resolved relative to the CSV's folder
    assert "relative to the CSV's folder" in msg


def test_corrupt_images_fail_and_one_good_image_in_the_probe_passes(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(FileNotFoundError, match=r"bad\.jpg \(not a readable image\)"):
        CsvSource(str(_csv(tmp_path, ["bad.jpg"] * 3)))
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    rows = ["missing.jpg"] * 7 + ["good.png"] + ["missing.jpg"] * 5
    assert CsvSource(str(_csv(tmp_path, rows))).size() == len(rows)  # missing rows are skipped in training
