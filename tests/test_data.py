"""Partitioning and loading of a participant's data (fl/fedfleet_app/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedfleet_app.data import (
    DEMO_CLASSES,
    DataError,
    DataSpec,
    dirichlet_partition,
    iid_partition,
    load_site,
    write_demo,
)
from PIL import Image

SPEC = DataSpec(classes=("covid", "normal", "pneumonia"), image_size=16, channels=1)


def write_images(root: Path, per_class: dict[str, int], size=(40, 30), mode="L", suffix=".png") -> None:
    rng = np.random.default_rng(0)
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = size[::-1] if mode == "L" else (*size[::-1], 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / name / f"img{i}{suffix}")


def test_iid_partition_covers_every_row_once():
    labels = np.repeat(np.arange(10), 50)
    shares = iid_partition(labels, 3, np.random.default_rng(1))
    joined = np.concatenate(shares)
    assert sorted(joined.tolist()) == list(range(500))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


def test_dirichlet_partition_is_skewed_and_deterministic():
    labels = np.repeat(np.arange(10), 100)
    shares = dirichlet_partition(labels, 3, alpha=0.1, rng=np.random.default_rng(7))
    again = dirichlet_partition(labels, 3, alpha=0.1, rng=np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))
    assert sorted(np.concatenate(shares).tolist()) == list(range(1000))
    # Total variation distance of each site's label mix from the global (uniform) one:
    # about 0.01 for an IID split, above 0.4 with alpha 0.1 (0.53-0.61 over seeds 0-4).
    distance = [0.5 * np.abs(np.bincount(labels[s], minlength=10) / len(s) - 0.1).sum() for s in shares]
    assert np.mean(distance) > 0.4


def test_dirichlet_large_alpha_approaches_iid():
    labels = np.repeat(np.arange(10), 300)
    shares = dirichlet_partition(labels, 3, alpha=1000.0, rng=np.random.default_rng(3))
    for share in shares:
        fractions = np.bincount(labels[share], minlength=10) / len(share)
        assert np.all(np.abs(fractions - 0.1) < 0.03)


def test_dirichlet_impossible_minimum_raises():
    with pytest.raises(ValueError, match="raise alpha or use fewer participants"):
        dirichlet_partition(np.arange(12) % 2, 3, alpha=0.01, rng=np.random.default_rng(0), min_share=5)


def test_image_folder_tree_loads_resized_grayscale(tmp_path: Path):
    write_images(tmp_path / "train", {"covid": 3, "normal": 2, "pneumonia": 0})
    write_images(tmp_path / "test", {"covid": 1, "normal": 1, "pneumonia": 1}, mode="RGB", suffix=".jpg")
    train, test = load_site(tmp_path, SPEC)
    assert train.x.shape == (5, 1, 16, 16) and train.x.dtype == np.float32
    assert train.y.tolist() == [0, 0, 0, 1, 1]
    assert test.x.shape == (3, 1, 16, 16)  # RGB JPEGs converted to grayscale
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0


def test_image_folder_tree_rgb(tmp_path: Path):
    write_images(tmp_path / "train", {"covid": 1, "normal": 1, "pneumonia": 1}, mode="L")
    write_images(tmp_path / "test", {"covid": 1, "normal": 1, "pneumonia": 1}, mode="RGB")
    spec = DataSpec(SPEC.classes, image_size=8, channels=3)
    train, _ = load_site(tmp_path, spec)
    assert train.x.shape == (3, 3, 8, 8)


def test_unsplit_tree_gets_a_stratified_seeded_holdout(tmp_path: Path):
    write_images(tmp_path, {"covid": 10, "normal": 10, "pneumonia": 5})
    train, test = load_site(tmp_path, SPEC)
    _train2, test2 = load_site(tmp_path, SPEC)
    assert len(test) == 2 + 2 + 1 and len(train) == 20
    assert np.array_equal(test.x, test2.x)
    assert sorted(test.y.tolist()) == [0, 0, 1, 1, 2]


def test_missing_class_folder_is_named(tmp_path: Path):
    write_images(tmp_path / "train", {"covid": 1, "normal": 1})
    write_images(tmp_path / "test", {"covid": 1, "normal": 1, "pneumonia": 1})
    with pytest.raises(DataError, match=r"train: missing class folder\(s\) pneumonia"):
        load_site(tmp_path, SPEC)


def test_misspelled_class_folder_is_named(tmp_path: Path):
    write_images(tmp_path / "train", {"covid": 1, "normal": 1, "Pneumonia": 1})
    write_images(tmp_path / "test", {"covid": 1, "normal": 1, "pneumonia": 1})
    with pytest.raises(DataError, match=r"folder\(s\) Pneumonia are not configured classes"):
        load_site(tmp_path, SPEC)


def test_corrupt_image_is_named(tmp_path: Path):
    write_images(tmp_path / "train", {"covid": 2, "normal": 1, "pneumonia": 1})
    write_images(tmp_path / "test", {"covid": 1, "normal": 1, "pneumonia": 1})
    bad = tmp_path / "train" / "normal" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"broken\.png is not a readable image"):
        load_site(tmp_path, SPEC)


def test_missing_and_empty_directories(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_site(tmp_path / "nope", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_site(tmp_path / "empty", SPEC)


def test_npz_layout_and_label_range(tmp_path: Path):
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "test.npz", x=x[:2], y=np.array([0, 5]))
    with pytest.raises(DataError, match=r"test\.npz: labels range over 0\.\.5 but there are 3 classes"):
        load_site(tmp_path, SPEC)
    np.savez(tmp_path / "test.npz", x=x[:2], y=np.array([0, 2]))
    train, test = load_site(tmp_path, SPEC)
    assert train.x.shape == (6, 1, 16, 16) and np.isclose(train.x.max(), x.max() / 255)
    assert test.y.tolist() == [0, 2]


def test_npz_missing_half_and_bad_arrays(tmp_path: Path):
    np.savez(tmp_path / "train.npz", x=np.zeros((2, 16, 16)), y=np.zeros(2, dtype=int))
    with pytest.raises(DataError, match=r"test\.npz is missing"):
        load_site(tmp_path, SPEC)
    np.savez(tmp_path / "test.npz", images=np.zeros((2, 16, 16)))
    with pytest.raises(DataError, match="must hold arrays 'x' and 'y'"):
        load_site(tmp_path, SPEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.0, -0.5])
def test_float_pixels_that_are_not_finite_or_out_of_range_are_named(tmp_path: Path, bad: float):
    x = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "test.npz", x=x, y=np.array([0, 1, 2]))
    x[1, 2, 3] = bad
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2]))
    expected = r"NaN or infinite pixel values" if not np.isfinite(bad) else r"float pixels range over"
    with pytest.raises(DataError, match=rf"train\.npz: .*{expected}"):
        load_site(tmp_path, SPEC)


def test_npz_is_resized_to_the_configured_size(tmp_path: Path):
    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    for split in ("train", "test"):
        np.savez(tmp_path / f"{split}.npz", x=x, y=np.array([0, 1, 2]))
    train, _ = load_site(tmp_path, SPEC)
    assert train.x.shape == (3, 1, 16, 16)


def test_write_demo_partitions_and_is_idempotent(tmp_path: Path):
    targets = [tmp_path / f"site{i}" for i in range(3)]
    counts = write_demo(targets, iid=False, alpha=0.5, seed=3, test_fraction=0.2)
    spec = DataSpec(DEMO_CLASSES, 8, 1)
    total = 0
    for target, count in zip(targets, counts, strict=True):
        train, test = load_site(target, spec)
        assert (len(train), len(test)) == (count["train"], count["test"])
        assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
        total += len(train) + len(test)
    assert total == 1797  # every digit of scikit-learn's set, each in one site
    before = [(t / "train.npz").stat().st_mtime_ns for t in targets]
    write_demo(targets, iid=False, alpha=0.5, seed=3, test_fraction=0.2)
    assert [(t / "train.npz").stat().st_mtime_ns for t in targets] == before
    write_demo(targets, iid=True, alpha=0.5, seed=3, test_fraction=0.2)
    manifest = json.loads((targets[0] / "demo.json").read_text())
    assert manifest["params"]["iid"] is True
