"""Eval-set readers and builders: real offline data in CLIP_benchmark's layout, CSV layout, bad inputs."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from alignkit.data.evalsets import (
    ClassificationSet,
    EvalSetError,
    RetrievalSet,
    load_csv_eval_set,
    load_eval_set,
    load_wds_eval_set,
)

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO / "scripts" / "build_evalsets.py"
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
OPENCLIPART = Path("/usr/share/openclipart/png")


def _builder():
    """The builder's code: ``alignkit build-evalsets`` (BUILDER, the checkout's script, is a wrapper of it)."""
    import alignkit.tools.build_evalsets as module

    return module


def _build(*args: str) -> None:
    _builder().main(list(args))  # in-process: the CLI parser is exercised without a fresh interpreter


def _png(color=(255, 0, 0), size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_wds(root: Path, samples: list[dict], classnames=("a", "b", "c"), templates=("a photo of a {c}.",)):
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for s in samples:
            sink.write(s)
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


# ---- builders on real data --------------------------------------------------------------------------


def test_build_and_read_digits(tmp_path):
    _build("digits", "--out", str(tmp_path), "--limit", "30", "--shard-size", "6")
    root = tmp_path / "digits"
    assert (root / "test" / "nshards.txt").read_text().strip() == "5"  # 5 x 6
    s = load_eval_set(root)
    assert isinstance(s, ClassificationSet)
    assert len(s.images) == len(s.labels) == 30
    assert s.classnames[:3] == ["zero", "one", "two"] and all("{c}" in t for t in s.templates)
    img = s.images[0]
    assert img.mode == "RGB" and img.size == (8, 8)
    # the same subset again for the same seed, a different one for another seed
    _build("digits", "--out", str(tmp_path / "again"), "--limit", "30")
    _build("digits", "--out", str(tmp_path / "other"), "--limit", "30", "--seed", "1")
    assert load_eval_set(tmp_path / "again" / "digits").labels == s.labels
    assert load_eval_set(tmp_path / "other" / "digits").labels != s.labels


@pytest.mark.slow
def test_builder_cli_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BUILDER), "digits", "--out", str(tmp_path), "--limit", "3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(load_eval_set(tmp_path / "digits").images) == 3
    proc = subprocess.run(
        [sys.executable, str(BUILDER), "digits", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "exists; pass --overwrite" in proc.stderr


def test_build_and_read_fashion_mnist(tmp_path):
    assert FASHION.is_file(), (
        f"{FASHION} is missing: install Debian's Fashion-MNIST with "
        "'apt-get install -y dataset-fashion-mnist' (the CI script does this)"
    )
    _build("fashion-mnist", "--out", str(tmp_path), "--limit", "40")
    s = load_wds_eval_set(tmp_path / "fashion_mnist")
    assert isinstance(s, ClassificationSet) and len(s.images) == 40
    assert s.classnames == [
        "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
    ]  # fmt: skip
    assert set(s.labels) <= set(range(10)) and len(set(s.labels)) > 3
    assert s.images[3].size == (28, 28)


def test_build_and_read_openclipart(tmp_path):
    assert OPENCLIPART.is_dir(), (
        f"{OPENCLIPART} is missing: install Debian's clip art with 'apt-get install -y openclipart-png'"
    )
    _build("openclipart", "--out", str(tmp_path), "--limit", "6", "--seed", "3")
    root = tmp_path / "openclipart"
    s = load_eval_set(root)
    assert isinstance(s, RetrievalSet) and len(s.images) == len(s.captions) == 6
    members = (root / "members.txt").read_text().split()
    assert len(members) == 6 and all((OPENCLIPART / m).is_file() for m in members)
    clipart_captions = _builder().clipart_captions  # its rule is checked on worked examples below
    for caps, member in zip(s.captions, members):
        # each image's captions read back exactly as the rule makes them from its path, in order
        assert caps == clipart_captions(Path(member)) and len(caps) in (1, 2)
        stem_words = [w for w in Path(member).stem.replace("-", "_").split("_") if w and not w.isdigit()]
        assert caps[0] == f"clip art of {' '.join(stem_words).lower()}."
    assert max(max(im.size) for im in s.images) <= 256
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"


def test_clipart_captions_only_add_category_when_informative():
    clipart_captions = _builder().clipart_captions
    assert clipart_captions(Path("food/fruit/lemon_half_slice_01.png")) == [
        "clip art of lemon half slice.",
        "lemon half slice, a drawing from the category food, fruit.",
    ]
    assert clipart_captions(Path("food/food_01.png")) == ["clip art of food."]  # category adds nothing
    assert clipart_captions(Path("shapes/0001.png")) == []  # no words, no caption


# ---- layouts ----------------------------------------------------------------------------------------


def test_wds_retrieval_multi_caption(tmp_path):
    _write_wds(
        tmp_path / "ret",
        [
            {"__key__": "k0", "jpg": _png(), "txt": b"first caption\nsecond caption\n\n"},
            {"__key__": "k1", "webp": _png((0, 0, 255)), "txt": b"only one"},
        ],
        classnames=None,
        templates=None,
    )
    s = load_wds_eval_set(tmp_path / "ret")
    assert isinstance(s, RetrievalSet)
    assert s.captions == [["first caption", "second caption"], ["only one"]]
    assert s.flat_captions() == (["first caption", "second caption", "only one"], [0, 0, 1])


def test_csv_layouts(tmp_path):
    for name, color in (("x.png", (255, 0, 0)), ("y.png", (0, 255, 0))):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(_png(color))
    (tmp_path / "cls.csv").write_text("image,label\nimg/x.png,1\nimg/y.png,cat\n")
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    c = load_csv_eval_set(tmp_path / "cls.csv")
    assert (
        isinstance(c, ClassificationSet)
        and c.labels == [1, 0]
        and c.images[1].getpixel((0, 0)) == (0, 255, 0)
    )
    (tmp_path / "ret.csv").write_text(
        "image,caption\nimg/x.png,red\nimg/y.png,green\nimg/x.png,a red block\n"
    )
    r = load_eval_set(tmp_path / "ret.csv")
    assert isinstance(r, RetrievalSet) and len(r.images) == 2  # x.png appears once in the gallery
    assert r.captions == [["red", "a red block"], ["green"]]


def test_rgba_is_composited_on_white(tmp_path):
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buf, format="PNG")  # fully transparent black
    _write_wds(tmp_path / "s", [{"__key__": "k", "png": buf.getvalue(), "cls": b"0"}])
    assert load_wds_eval_set(tmp_path / "s").images[0].getpixel((1, 1)) == (255, 255, 255)


# ---- bad inputs: the message names the file and the problem -----------------------------------------


def test_missing_classnames(tmp_path):
    _write_wds(tmp_path / "s", [{"__key__": "k", "png": _png(), "cls": b"0"}], classnames=None)
    with pytest.raises(EvalSetError, match=r"classnames\.txt: missing class names"):
        load_wds_eval_set(tmp_path / "s")


def test_missing_templates_and_bad_template(tmp_path):
    _write_wds(tmp_path / "s", [{"__key__": "k", "png": _png(), "cls": b"0"}], templates=None)
    with pytest.raises(EvalSetError, match=r"zeroshot_classification_templates\.txt: missing"):
        load_wds_eval_set(tmp_path / "s")
    (tmp_path / "s" / "zeroshot_classification_templates.txt").write_text("a photo of a {}\n")
    with pytest.raises(EvalSetError, match=r"without '\{c\}'"):
        load_wds_eval_set(tmp_path / "s")


def test_labels_out_of_range(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _png(), "cls": str(y).encode()} for i, y in enumerate([0, 2, 5])]
    _write_wds(tmp_path / "s", samples, classnames=("a", "b", "c"))
    with pytest.raises(
        EvalSetError, match=r"labels \[5\] are out of range for the 3 class names in .*classnames\.txt"
    ):
        load_wds_eval_set(tmp_path / "s")


def test_empty_shard(tmp_path):
    _write_wds(tmp_path / "s", [{"__key__": "k", "png": _png(), "cls": b"0"}])
    with tarfile.open(tmp_path / "s" / "test" / "1.tar", "w"):
        pass  # a valid tar with no members
    with pytest.raises(EvalSetError, match=r"1\.tar: shard holds no samples"):
        load_wds_eval_set(tmp_path / "s")


def test_no_shards_and_corrupt_shard(tmp_path):
    (tmp_path / "s" / "test").mkdir(parents=True)
    with pytest.raises(EvalSetError, match=r"no \*\.tar shards found"):
        load_wds_eval_set(tmp_path / "s")
    (tmp_path / "s" / "test" / "0.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(EvalSetError, match=r"0\.tar: "):
        load_wds_eval_set(tmp_path / "s")


def test_sample_without_image_or_label(tmp_path):
    _write_wds(tmp_path / "a", [{"__key__": "k7", "cls": b"0"}])
    with pytest.raises(EvalSetError, match="sample 'k7' has no image"):
        load_wds_eval_set(tmp_path / "a")
    _write_wds(tmp_path / "b", [{"__key__": "k8", "png": _png()}])
    with pytest.raises(EvalSetError, match=r"sample 'k8' has neither \.cls"):
        load_wds_eval_set(tmp_path / "b")


def test_csv_missing_image_and_bad_label(tmp_path):
    (tmp_path / "x.png").write_bytes(_png())
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    (tmp_path / "a.csv").write_text("image,label\nx.png,0\nmissing.png,1\n")
    with pytest.raises(EvalSetError, match=r"a\.csv: 1 image file\(s\) not found, e\.g\. \['missing\.png'\]"):
        load_csv_eval_set(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("image,label\nx.png,2\n")
    with pytest.raises(EvalSetError, match=r"b\.csv: labels \[2\] are out of range"):
        load_csv_eval_set(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("image,label\nx.png,horse\n")
    with pytest.raises(EvalSetError, match=r"c\.csv:2: label 'horse'"):
        load_csv_eval_set(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("path,label\nx.png,0\n")
    with pytest.raises(EvalSetError, match="header must be"):
        load_csv_eval_set(tmp_path / "d.csv")


def test_write_eval_shards_gives_every_default_worker_a_shard_in_order(tmp_path):
    from alignkit.data.evalsets import write_eval_shards

    rows = [{"__key__": f"{i:03d}", "png": _png((i, 0, 0)), "cls": str(i % 3)} for i in range(10)]
    assert write_eval_shards(tmp_path / "a" / "test", rows, shard_size=1000) == 10
    names = sorted(p.name for p in (tmp_path / "a" / "test").iterdir())
    assert names == [
        "0.tar",
        "1.tar",
        "2.tar",
        "3.tar",
        "nshards.txt",
    ]  # CLIP_benchmark's {0..n-1}.tar naming
    assert (tmp_path / "a" / "test" / "nshards.txt").read_text() == "4\n"
    sizes = []
    for i in range(4):
        with tarfile.open(tmp_path / "a" / "test" / f"{i}.tar") as tar:
            sizes.append(len(tar.getnames()) // 2)
    assert sorted(sizes) == [2, 2, 3, 3]  # 10 samples spread evenly over 4 shards
    (tmp_path / "a" / "classnames.txt").write_text("x\ny\nz\n")
    (tmp_path / "a" / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    ds = load_wds_eval_set(tmp_path / "a")
    assert ds.labels == [i % 3 for i in range(10)]  # the order survives the split
    assert [ds.images[i].getpixel((0, 0))[0] for i in range(10)] == list(range(10))
    # larger sets: shards of at most shard_size; fewer samples than workers: one shard each
    assert write_eval_shards(tmp_path / "b", rows, shard_size=2) == 10
    assert (tmp_path / "b" / "nshards.txt").read_text() == "5\n"
    write_eval_shards(tmp_path / "c", rows[:2])
    assert (tmp_path / "c" / "nshards.txt").read_text() == "2\n"
    with pytest.raises(EvalSetError, match="no samples to write"):
        write_eval_shards(tmp_path / "d", [])
