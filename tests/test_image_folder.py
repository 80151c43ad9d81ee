"""Image folders and ``datasets`` directories as training sources: labels, splits, and every bad-data case."""

import os

import numpy as np
import pytest

from flax_resnet.imagedata import pipeline, sources

Image = pytest.importorskip("PIL.Image")


def _folder(root, classes=("cat", "dog"), n=6, size=(20, 24), split=None, fmt="png", seed=0):
    """``root[/split]/<class>/<i>.<fmt>``: class k's images have mean intensity 40 + 80 k (checked below)."""
    rng = np.random.default_rng(seed)
    base = root / split if split else root
    for k, c in enumerate(classes):
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = np.clip(rng.normal(40 + 80 * k, 5, size + (3,)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(base / c / f"{i}.{fmt}")
    return root


def _decoded_mean(payload):
    return float(np.asarray(pipeline.decode(payload)).mean())


def test_labels_follow_sorted_folder_names_and_val_folder(tmp_path):
    root = _folder(tmp_path, classes=("zebra", "ant", "mole"), split="train")
    _folder(tmp_path, classes=("ant", "zebra"), split="val", n=2, seed=1)  # val may lack a class; labels stay train's
    s = sources.open_splits(str(root))
    assert s.classes == ("ant", "mole", "zebra") and s.kind == "folder"
    assert len(s.train) == 18 and len(s.val) == 4
    for split, names in ((s.train, ("ant", "mole", "zebra")), (s.val, ("ant", "zebra"))):
        for i in range(len(split)):
            path, label = split.records[i]
            assert os.path.basename(os.path.dirname(path)) == s.classes[label]
            assert s.classes[label] in names
    # The pixels carry the class they were written as: _folder wrote "ant" second (k=1, mean 120).
    path, label = s.train.records[0]
    assert s.classes[label] == "ant" and abs(_decoded_mean(path) - 120) < 10


def test_flat_folder_gets_a_seeded_stratified_split(tmp_path):
    _folder(tmp_path, n=10)
    a = sources.open_splits(str(tmp_path), val_fraction=0.2, seed=3)
    b = sources.open_splits(str(tmp_path), val_fraction=0.2, seed=3)
    c = sources.open_splits(str(tmp_path), val_fraction=0.2, seed=4)
    assert len(a.train) == 16 and len(a.val) == 4
    assert sorted(a.val.records.labels.tolist()) == [0, 0, 1, 1]  # stratified
    assert a.val.records.paths == b.val.records.paths and a.identity() == b.identity()
    assert a.val.records.paths != c.val.records.paths and a.identity() != c.identity()
    assert not set(a.train.records.paths) & set(a.val.records.paths)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_datasets_directory(tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["circle", "square"])})

    def rows(n, seed):
        rng = np.random.default_rng(seed)
        labels = [i % 2 for i in range(n)]
        imgs = [Image.fromarray(np.full((12, 14, 3), 40 + 150 * l, np.uint8) + rng.integers(0, 5, (12, 14, 3), dtype=np.uint8)) for l in labels]
        return datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats)

    d = datasets.DatasetDict({"train": rows(10, 0), "validation": rows(4, 1)})
    path = tmp_path / "ds"
    if layout == "save_to_disk":
        d.save_to_disk(str(path))
    else:
        (path / "data").mkdir(parents=True)
        d["train"].to_parquet(str(path / "data" / "train-00000.parquet"))
        d["validation"].to_parquet(str(path / "data" / "validation-00000.parquet"))
    s = sources.open_splits(str(path))
    assert s.kind == "hf" and s.classes == ("circle", "square") and (len(s.train), len(s.val)) == (10, 4)
    for split in (s.train, s.val):
        for i in range(len(split)):
            payload, label = split.records[i]
            assert abs(_decoded_mean(payload) - (42 + 150 * label)) < 3
    assert repr(s.train.records) == repr(sources.open_splits(str(path)).train.records)  # grain checks it on resume


def test_bad_datasets_row_is_named_by_its_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    png = tmp_path / "ok.png"
    Image.new("RGB", (6, 6), (9, 9, 9)).save(png)
    rows = [{"bytes": png.read_bytes(), "path": None}] * 3 + [{"bytes": b"GIF89a not really", "path": None}]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = lambda n: datasets.Dataset.from_dict({"image": rows[:n], "label": [0, 1, 0, 1][:n]}, features=feats)  # noqa: E731
    datasets.DatasetDict({"train": split(4), "validation": split(2)}).save_to_disk(str(tmp_path / "ds"))
    records = sources.open_splits(str(tmp_path / "ds")).train.records
    assert np.asarray(pipeline.decode(records[0][0])).mean() == 9
    with pytest.raises(pipeline.BadImage, match=rf"^{tmp_path / 'ds'} \[train\] row 3 \('image'\): not a readable image \(UnidentifiedImageError"):
        pipeline.decode(records[3][0])


def test_datasets_directory_without_label_column_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "target": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(sources.DataError, match=r"ds \[train\]: needs an image column .* it has image, target$"):
        sources.open_splits(str(tmp_path / "ds"))


# ------------------------------------------------------------------ bad data: one test per case


def test_empty_class_folder_is_refused(tmp_path):
    _folder(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    for on_bad in sources.ON_BAD:
        with pytest.raises(sources.DataError, match=r"empty: empty class folder"):
            sources.open_splits(str(tmp_path), on_bad=on_bad)


def test_val_class_not_in_train_is_refused(tmp_path):
    _folder(tmp_path, split="train")
    _folder(tmp_path, classes=("cat", "fox"), split="val", n=2)
    with pytest.raises(sources.DataError, match=r"val: class folder 'fox' is not in the training classes \(2: cat, dog\)"):
        sources.open_splits(str(tmp_path))


def test_files_without_an_image_extension_are_ignored_and_counted(tmp_path):
    _folder(tmp_path, n=5)
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "dog" / "labels.csv").write_text("a,b\n")
    s = sources.open_splits(str(tmp_path))
    assert s.report["ignored"] == 2 and len(s.train) + len(s.val) == 10


def test_non_image_file_with_image_extension(tmp_path):
    _folder(tmp_path, n=5)
    bad = tmp_path / "dog" / "readme.jpg"
    bad.write_text("not a picture")
    with pytest.raises(sources.DataError, match=rf"^{bad}: not a readable image \(UnidentifiedImageError.*--on-bad-image skip"):
        sources.open_splits(str(tmp_path))
    s = sources.open_splits(str(tmp_path), on_bad="skip")
    assert len(s.report["skipped"]) == 1 and str(bad) in s.report["skipped"][0]
    assert str(bad) not in s.train.records.paths + s.val.records.paths and len(s.train) + len(s.val) == 10


def test_truncated_image_fails_at_decode(tmp_path):
    _folder(tmp_path, n=5, fmt="jpg", size=(64, 64))
    bad = tmp_path / "cat" / "0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # the header reads; the pixels do not
    s = sources.open_splits(str(tmp_path), val_fraction=0.2)
    assert s.report.get("skipped") is None  # headers only: found when decoded
    with pytest.raises(pipeline.BadImage, match=rf"^{bad}: not a readable image \(OSError: image file is truncated"):
        pipeline.decode(str(bad))


def test_oversized_and_extreme_aspect_images(tmp_path):
    _folder(tmp_path, n=5)
    strip = tmp_path / "cat" / "strip.png"
    Image.new("RGB", (20000, 1)).save(strip)
    with pytest.raises(sources.DataError, match=rf"^{strip}: 20000x1 has an aspect ratio over 50:1"):
        sources.open_splits(str(tmp_path))
    s = sources.open_splits(str(tmp_path), on_bad="skip")
    assert any("20000x1" in m for m in s.report["skipped"])
    with pytest.raises(pipeline.BadImage, match="aspect ratio"):  # the same check guards decoding (datasets rows, arrays)
        pipeline.decode(str(strip))
    big = tmp_path / "big.png"
    Image.new("1", (10000, 9000)).save(big)  # 90 Mpx at 1 bit per pixel: a 12 KB file
    with pytest.raises(pipeline.BadImage, match=r"10000x9000 is over 89,478,485 pixels"):
        pipeline.decode(str(big))


@pytest.mark.parametrize(
    "mode, make, lost",
    [
        ("L", lambda: Image.fromarray(np.full((8, 8), 77, np.uint8)), None),
        ("RGBA", lambda: Image.fromarray(np.full((8, 8, 4), 77, np.uint8)), "alpha channel dropped"),
        ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 178)), "without a color profile"),
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 300, np.uint16)), "16-bit values clipped"),
    ],
)
def test_modes_convert_like_torchvision_and_warn_once(tmp_path, capsys, mode, make, lost):
    _folder(tmp_path, n=4)
    for i in range(3):
        img = make()
        assert img.mode == mode
        img.save(tmp_path / "dog" / f"m{i}.{'jpg' if mode == 'CMYK' else 'png' if mode != 'I;16' else 'tif'}")
    s = sources.open_splits(str(tmp_path), val_fraction=0.1)
    err = capsys.readouterr().err
    path = next(p for p in s.train.records.paths + s.val.records.paths if "/m" in p)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))  # torchvision's pil_loader
    got = np.asarray(pipeline.decode(path))
    assert got.shape == (8, 8, 3) and np.array_equal(got, expected)
    if lost is None:
        assert err == ""
    else:
        assert err.count("warning:") == 1 and lost in err and f"{Image.open(path).mode} images" in err
    if mode == "I;16":
        assert got.max() == 255  # 300 clipped, as torchvision's loader does


def test_missing_path_and_plain_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        sources.open_splits(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("1")
    with pytest.raises(sources.DataError, match=r"x.csv: a file, but not a .npz"):
        sources.open_splits(str(tmp_path / "x.csv"))
    (tmp_path / "d").mkdir()
    with pytest.raises(sources.DataError, match="no images, parquet files or datasets directory found"):
        sources.open_splits(str(tmp_path / "d"))


def test_optional_dependencies_load_only_when_used(monkeypatch):
    import subprocess
    import sys

    code = ("import sys, flax_resnet, flax_resnet.cli; flax_resnet.cli.build_parser(); "
            "print(sorted(m for m in ('grain', 'datasets', 'PIL') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    monkeypatch.setitem(sys.modules, "grain", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match=r"^streaming image folders needs grain: pip install 'flax-resnet\[data\]'$"):
        pipeline._grain()
    with pytest.raises(ModuleNotFoundError, match=r"needs datasets: pip install 'flax-resnet\[datasets\]'$"):
        sources._datasets()
