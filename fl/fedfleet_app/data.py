"""A participant's data: loading from its own directory, and the built-in demo set.

No Flower and no torch here: loaders return numpy arrays, so the CLI can check a
participant's data before a run with the very code the ClientApp uses during it.

Accepted layouts of a participant's data directory (`data-path` in node config):

    train.npz + test.npz          arrays `x` (N,H,W) or (N,H,W,C) and `y` (N,) class indices
    train/<class>/*.png|jpg       an image-folder tree per split, one folder per class
    test/<class>/*.png|jpg
    data.npz  or  <class>/*.png   no split given: a stratified held-out split is made
                                  with `test_fraction` and `seed` (the same on every run)

Image-folder trees must hold one folder per configured class (an empty folder
is fine for a class a site does not have); images are converted to grayscale or
RGB and resized to `image_size` x `image_size`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")


class DataError(Exception):
    """A participant's data is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class DataSpec:
    """What the model expects; the same at every participant."""

    classes: tuple[str, ...]
    image_size: int
    channels: int
    test_fraction: float = 0.2
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, C, S, S) in [0, 1]
    y: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


def load_site(data_path: str | Path, spec: DataSpec) -> tuple[Split, Split]:
    """Return the (train, held-out test) splits found in `data_path`."""
    root = Path(data_path)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist; create it or fix data-path")
    if not root.is_dir():
        raise DataError(f"data-path {root} is a file, not a directory")
    if (root / "train.npz").exists() or (root / "test.npz").exists():
        train, test = (_load_npz(root / f"{split}.npz", spec) for split in SPLITS)
    elif (root / "train").is_dir() or (root / "test").is_dir():
        train, test = (_load_image_tree(root / split, spec) for split in SPLITS)
    elif (root / "data.npz").exists():
        train, test = _split(_load_npz(root / "data.npz", spec), spec)
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        train, test = _split(_load_image_tree(root, spec), spec)
    else:
        raise DataError(
            f"data directory {root} is empty: expected train.npz + test.npz, train/ + test/ "
            f"class folders, data.npz, or one folder per class ({', '.join(spec.classes)})"
        )
    if len(train) == 0:
        raise DataError(f"{root} holds no training examples")
    if len(test) == 0:
        raise DataError(f"{root} holds no held-out test examples")
    return train, test


def _load_npz(path: Path, spec: DataSpec) -> Split:
    if not path.exists():
        raise DataError(f"{path} is missing (npz layout needs both train.npz and test.npz)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (found: {sorted(arrays)})")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable .npz file: {err}") from err
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: x has shape {x.shape}; expected (N,H,W) or (N,H,W,C) with C = 1 or 3")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: y has shape {y.shape}; expected ({len(x)},) class indices")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise DataError(
            f"{path}: labels range over {int(y.min())}..{int(y.max())} but there are "
            f"{spec.num_classes} classes ({', '.join(spec.classes)})"
        )
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():  # NaN would pass the range check below, and poison training
            raise DataError(
                f"{path}: x holds {int((~np.isfinite(x)).sum())} NaN or infinite pixel values; "
                "replace or drop those images"
            )
        if len(x) and (x.min() < 0.0 or x.max() > 1.0):
            raise DataError(
                f"{path}: float pixels range over {x.min():g}..{x.max():g}; "
                "store them scaled to [0, 1], or as uint8 0..255"
            )
    return Split(_fit(x, spec), y.astype(np.int64))


def _fit(x: np.ndarray, spec: DataSpec) -> np.ndarray:
    """(N,H,W,C) float in [0,1] -> (N,channels,S,S), converting channels and size."""
    if x.shape[-1] != spec.channels:
        x = x.mean(axis=-1, keepdims=True) if spec.channels == 1 else np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (spec.image_size, spec.image_size):
        from PIL import Image

        mode = "L" if spec.channels == 1 else "RGB"
        resized = [
            np.asarray(
                Image.fromarray((img.squeeze(-1) if spec.channels == 1 else img) * 255)
                .convert(mode)
                .resize((spec.image_size, spec.image_size)),
                dtype=np.float32,
            )
            / 255.0
            for img in x
        ]
        x = np.stack(resized).reshape(len(x), spec.image_size, spec.image_size, spec.channels)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def _load_image_tree(root: Path, spec: DataSpec) -> Split:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"{root} is missing (image-folder layout needs both train/ and test/)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in spec.classes if c not in found]
    unknown = [c for c in found if c not in spec.classes]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing class folder(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"folder(s) {', '.join(unknown)} are not configured classes")
        raise DataError(
            f"{root}: {'; '.join(parts)} (expected exactly: {', '.join(spec.classes)}). "
            "Every participant needs one folder per class, empty if it has no such "
            "images; rename the folders or fix the class list in the stack's data.classes"
        )
    mode = "L" if spec.channels == 1 else "RGB"
    size = (spec.image_size, spec.image_size)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(spec.classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue
            try:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert(mode).resize(size), dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise DataError(f"{path} is not a readable image ({err}); replace or remove it") from err
            images.append(pixels.reshape(*size, spec.channels) / 255.0)
            labels.append(label)
    if not images:
        return Split(np.zeros((0, spec.channels, *size), dtype=np.float32), np.zeros(0, dtype=np.int64))
    x = np.stack(images).transpose(0, 3, 1, 2)
    return Split(np.ascontiguousarray(x, dtype=np.float32), np.asarray(labels, dtype=np.int64))


def _split(data: Split, spec: DataSpec) -> tuple[Split, Split]:
    """Stratified, seeded held-out split: the same rows on every run."""
    rng = np.random.default_rng(spec.seed)
    test_rows: list[np.ndarray] = []
    for label in np.unique(data.y):
        rows = rng.permutation(np.flatnonzero(data.y == label))
        test_rows.append(rows[: round(len(rows) * spec.test_fraction)])
    test_idx = np.sort(np.concatenate(test_rows)) if test_rows else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(data), dtype=bool)
    train_mask[test_idx] = False
    return Split(data.x[train_mask], data.y[train_mask]), Split(data.x[test_idx], data.y[test_idx])


# --- The built-in demo set ---------------------------------------------------------

DEMO_CLASSES = tuple(str(d) for d in range(10))
DEMO_IMAGE_SIZE = 8
DEMO_MANIFEST = "demo.json"


def iid_partition(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal the rows into `parts` near-equal shares."""
    return [np.sort(share) for share in np.array_split(rng.permutation(len(labels)), parts)]


def dirichlet_partition(
    labels: np.ndarray,
    parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_share: int = 10,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided by proportions drawn from Dir(alpha).

    Small alpha gives each participant few classes; large alpha approaches IID.
    Draws again (up to 100 times) until every share has at least `min_share` rows.
    """
    for _ in range(100):
        shares: list[list[int]] = [[] for _ in range(parts)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * parts))[:-1] * len(rows)).astype(int)
            for share, chunk in zip(shares, np.split(rows, cuts), strict=True):
                share.extend(chunk.tolist())
        if min(len(s) for s in shares) >= min_share:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]
    raise ValueError(
        f"could not give each of {parts} participants {min_share} rows with alpha={alpha}; "
        "raise alpha or use fewer participants"
    )


def write_demo(
    targets: Sequence[Path],
    *,
    iid: bool,
    alpha: float,
    seed: int,
    test_fraction: float,
) -> list[dict[str, object]]:
    """Write one partition of scikit-learn's digits (shipped with the package) per target.

    Each target gets train.npz and test.npz (8x8 grayscale, 10 classes) and a
    demo.json manifest; targets whose manifest already matches are left alone.
    Returns per-target counts.
    """
    params = {
        "dataset": "sklearn-digits",
        "parts": len(targets),
        "iid": iid,
        "alpha": alpha,
        "seed": seed,
        "test_fraction": test_fraction,
    }
    written: list[dict[str, object]] = []
    manifests = [_read_manifest(t) for t in targets]
    if all(m is not None and m["params"] == {**params, "index": i} for i, m in enumerate(manifests)):
        return [m["counts"] for m in manifests if m is not None]

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    shares = iid_partition(y, len(targets), rng) if iid else dirichlet_partition(y, len(targets), alpha, rng)
    spec = DataSpec(DEMO_CLASSES, DEMO_IMAGE_SIZE, 1, test_fraction, seed)
    for index, (target, rows) in enumerate(zip(targets, shares, strict=True)):
        train, test = _split(Split(x[rows][:, None], y[rows]), spec)
        target.mkdir(parents=True, exist_ok=True)
        for name, split in (("train", train), ("test", test)):
            tmp = target / f".{name}.npz.tmp"
            with tmp.open("wb") as fh:
                np.savez(fh, x=split.x[:, 0], y=split.y)
            tmp.replace(target / f"{name}.npz")
        counts = {
            "train": len(train),
            "test": len(test),
            "per_class": np.bincount(y[rows], minlength=len(DEMO_CLASSES)).tolist(),
        }
        manifest = {"params": {**params, "index": index}, "counts": counts}
        (target / DEMO_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        written.append(counts)
    return written


def _read_manifest(target: Path) -> dict | None:
    try:
        manifest = json.loads((target / DEMO_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not all((target / f"{s}.npz").exists() for s in SPLITS):
        return None
    return manifest if isinstance(manifest, dict) else None
