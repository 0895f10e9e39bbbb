"""MNIST in the IDX format: image and label files, writing, locating the files and the deterministic splits.

Files are read by the strict reader in `service.idx`; on top of it this module checks what MNIST needs
(uint8 28x28 images, labels 0..9, matching counts). Every problem is a `DataError` naming the file.
Nothing here imports torch, so `digits evaluate` works on a server install.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.idx import IDX_DTYPES, IdxError, read_idx
from service.recognition.model_metadata import Normalization

NUM_CLASSES = 10
IMAGE_SIZE = 28

# Input normalization, defined once: mean and std of pixel/255 over the MNIST training set.
# Written into every exported model's metadata; the server and `digits evaluate` read it from there.
NORMALIZATION = Normalization(scale=1 / 255, mean=0.1307, std=0.3081)

# The canonical MNIST file names per split (torchvision and the original site use the same ones).
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Where the files may sit inside --data-dir: directly, or torchvision's MNIST/raw layout.
SEARCH_SUBDIRS = (".", "MNIST/raw", "raw")

_IDX_CODES = {dtype: code for code, dtype in IDX_DTYPES.items()}

# One error type for every data problem: the shared IDX reader's (a ValueError naming the file).
DataError = IdxError


@dataclass(frozen=True)
class Digits:
    """Labelled digits: ``images`` uint8 [N, 28, 28] (ink bright), ``labels`` uint8 [N] in 0..9."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    """Human-readable origin (files, or which indices of which files)."""
    sha256: dict[str, str]
    """sha256 of each source file by name, so a model can say exactly what it was trained on."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray, description: str) -> Digits:
        """The digits at `indices`, with `description` appended to the source."""
        return Digits(
            images=self.images[indices],
            labels=self.labels[indices],
            source=f"{self.source} {description}",
            sha256=self.sha256,
        )


@functools.cache
def _root() -> Path:
    """The repository the command runs in (git's top level of the working directory), else the directory."""
    try:
        done = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return Path.cwd()
    return Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else Path.cwd()


def display_path(path: str | Path) -> str:
    """`path` relative to the repository (e.g. ``../shared/data/mnist-sample``), for what a model records:
    the same command then reads the same on every checkout."""
    return os.path.relpath(Path(path).resolve(), _root().resolve())


# --- reading ---------------------------------------------------------------------------------------


def read_images(path: str | Path) -> np.ndarray:
    """Read an MNIST image file: magic 0x00000803, uint8 [N, 28, 28]."""
    path = Path(path)
    array = read_idx(path)
    if array.dtype != np.uint8 or array.ndim != 3:
        raise DataError(
            f"{path}: expected an image file (magic 0x00000803, uint8 with 3 dimensions), "
            f"got {array.dtype} with {array.ndim} dimension(s)"
        )
    if array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images are {array.shape[1]}x{array.shape[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return array


def read_labels(path: str | Path) -> np.ndarray:
    """Read an MNIST label file: magic 0x00000801, uint8 [N] with values 0..9."""
    path = Path(path)
    array = read_idx(path)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise DataError(
            f"{path}: expected a label file (magic 0x00000801, uint8 with 1 dimension), "
            f"got {array.dtype} with {array.ndim} dimension(s)"
        )
    if array.size and int(array.max()) >= NUM_CLASSES:
        bad = int(np.argmax(array >= NUM_CLASSES))
        raise DataError(f"{path}: label {int(array[bad])} at index {bad} is out of range 0..{NUM_CLASSES - 1}")
    return array


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file, gzip-compressed when the name ends in .gz (reproducibly: mtime 0)."""
    path = Path(path)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


# --- locating and loading splits -------------------------------------------------------------------


def _find_file(data_dir: Path, stem: str) -> Path | None:
    for sub in SEARCH_SUBDIRS:
        for name in (f"{stem}.gz", stem):
            candidate = data_dir / sub / name
            if candidate.is_file():
                return candidate
    return None


def split_files(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) paths of `split` in `data_dir`; `DataError` says what is missing and where."""
    data_dir = Path(data_dir)
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLIT_FILES)})")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    found = [_find_file(data_dir, stem) for stem in SPLIT_FILES[split]]
    missing = [stem for stem, path in zip(SPLIT_FILES[split], found, strict=True) if path is None]
    if missing:
        places = ", ".join(str(data_dir / sub) for sub in SEARCH_SUBDIRS)
        raise DataError(
            f"{data_dir}: missing {' and '.join(f'{m}[.gz]' for m in missing)} for the {split} split "
            f"(looked in {places})"
        )
    images, labels = found
    assert images is not None and labels is not None
    return images, labels


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether both files of `split` exist in `data_dir` (their content is not checked here)."""
    try:
        split_files(data_dir, split)
    except DataError:
        return False
    return True


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes as stored (compressed or not)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_split(data_dir: str | Path, split: str) -> Digits:
    """Load and cross-check the images and labels of `split` ("train" or "test") from `data_dir`."""
    images_path, labels_path = split_files(data_dir, split)
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    return Digits(
        images=images,
        labels=labels,
        source=f"{images_path.name}+{labels_path.name} in {display_path(images_path.parent)}",
        sha256={path.name: file_sha256(path) for path in (images_path, labels_path)},
    )


def load_source(data_dir: str | Path) -> tuple[Digits, Digits | None, np.ndarray, np.ndarray]:
    """The train-* digits, the t10k-* digits when present, and both as the one sequence a cross-validated
    run's indices point into (train-* first): (train, test, images, labels)."""
    train = load_split(data_dir, "train")
    if not has_split(data_dir, "test"):
        return train, None, train.images, train.labels
    test = load_split(data_dir, "test")
    return (train, test, np.concatenate([train.images, test.images]),
            np.concatenate([train.labels, test.labels]))


def write_split(data_dir: str | Path, split: str, digits: Digits) -> tuple[Path, Path]:
    """Write `digits` as the gzip IDX pair of `split` in `data_dir` (e.g. a held-out set as t10k-*)."""
    images_stem, labels_stem = SPLIT_FILES[split]
    data_dir = Path(data_dir)
    return (
        write_idx(data_dir / f"{images_stem}.gz", digits.images),
        write_idx(data_dir / f"{labels_stem}.gz", digits.labels),
    )


# --- deterministic, stratified hold-out ------------------------------------------------------------

SPLIT_SEED = 20261123
"""Seed of the hold-out draw; changing it changes which digits are validation/test (see docs/training.md)."""


def _quotas(counts: np.ndarray, n: int) -> np.ndarray:
    """Split `n` over classes in proportion to `counts` (largest remainder, ties to the lower class)."""
    total = int(counts.sum())
    if n > total:
        raise DataError(f"cannot hold out {n} digits from only {total}")
    exact = counts * n / total
    quotas = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(counts.size), -(exact - quotas)))
    quotas[order[: n - int(quotas.sum())]] += 1
    return quotas


def stratified_holdout(labels: np.ndarray, sizes: Sequence[int], seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """Deterministically split indices of `labels` into parts of `sizes` plus the rest, stratified by class.

    Returns ``len(sizes) + 1`` sorted index arrays: one per requested size, then the remaining indices.
    Each part has every class in proportion to its share of `labels` (largest-remainder rounding), and
    the digits of a class are taken in the order of ``numpy.random.default_rng(seed).permutation``.
    """
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    left = np.bincount(labels, minlength=NUM_CLASSES)
    # Each part's per-class quota is proportional to what the previous parts left over.
    quotas = []
    for size in sizes:
        quota = _quotas(left, size)
        quotas.append(quota)
        left = left - quota
    parts: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for cls in range(left.size):
        members = order[labels[order] == cls]
        start = 0
        for chunks, quota in zip(parts, quotas, strict=False):
            chunks.append(members[start : start + quota[cls]])
            start += int(quota[cls])
        parts[-1].append(members[start:])
    return tuple(np.sort(np.concatenate(chunks)) for chunks in parts)


FIRST_DRAW = 1000
"""Size of the first (validation) draw of the first shipped model's split, kept so that `cv_split`
holds out the same test digits as that split did (the fixture's t10k digits are among them)."""


def cv_split(labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(test, pool): the digits held out for one final measurement, and all the others (for k-fold).

    The test part is the second draw of ``stratified_holdout(labels, [1000, test_size], seed)``; the first
    draw goes back into the pool. On the 8,000-digit sample with the default seed and 1,000 test digits
    these are exactly the test digits of the first shipped model. `test_size` 0: everything is pool.
    """
    if test_size <= 0:
        return np.zeros(0, np.int64), np.arange(len(labels))
    first, test, rest = stratified_holdout(labels, [min(FIRST_DRAW, len(labels) - test_size), test_size], seed)
    return test, np.sort(np.concatenate([first, rest]))


def stratified_folds(labels: np.ndarray, folds: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """`folds` disjoint sorted index arrays covering `labels`, each class dealt out in turn.

    The digits of each class are taken in the order of ``numpy.random.default_rng(seed).permutation`` and
    dealt to the folds round-robin, each class starting where the previous one stopped, so that fold
    sizes differ by at most one and every fold has each class in proportion.
    """
    labels = np.asarray(labels)
    if folds < 2 or folds > len(labels):
        raise DataError(f"cannot make {folds} folds of {len(labels)} digits")
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    fold_of = np.empty(labels.shape[0], dtype=np.int64)
    start = 0
    for cls in range(NUM_CLASSES):
        members = order[labels[order] == cls]
        fold_of[members] = (start + np.arange(members.size)) % folds
        start = (start + members.size) % folds
    return tuple(np.flatnonzero(fold_of == fold) for fold in range(folds))


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts a run uses; only `train` is trained on, only `val` selects the model."""

    train: Digits
    val: Digits
    test: Digits
    validation_description: str
    test_description: str
    test_is_holdout: bool
    """True when `test` was carved out of the train files (no t10k-* in the data dir)."""
    val_indices: np.ndarray
    test_indices: np.ndarray | None
    """Indices into the train files; None when the test set is the real t10k-* files."""


def prepare_splits(data_dir: str | Path, val_size: int = 1000, test_size: int = 1000, seed: int = SPLIT_SEED) -> Splits:
    """Load `data_dir` and split it: validation (and, without t10k-* files, test) held out of train."""
    full = load_split(data_dir, "train")
    rule = f"stratified by class, numpy.random.default_rng({seed})"
    if has_split(data_dir, "test"):
        test = load_split(data_dir, "test")
        val_idx, train_idx = stratified_holdout(full.labels, [val_size], seed)
        test_idx = None
        test_description = f"all {len(test)} digits of the t10k-* files"
    else:
        val_idx, test_idx, train_idx = stratified_holdout(full.labels, [val_size, test_size], seed)
        test = full.subset(test_idx, f"[{len(test_idx)} held-out test digits]")
        test_description = (
            f"{len(test_idx)} digits held out of the train-* files ({rule}, second draw after validation)"
        )
    return Splits(
        train=full.subset(train_idx, f"[{len(train_idx)} training digits]"),
        val=full.subset(val_idx, f"[{len(val_idx)} validation digits]"),
        test=test,
        validation_description=f"{len(val_idx)} digits held out of the train-* files ({rule})",
        test_description=test_description,
        test_is_holdout=test_idx is not None,
        val_indices=val_idx,
        test_indices=test_idx,
    )
