"""IDX reading/writing, corruption handling, file layouts and the deterministic hold-out splits."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from training.data import (
    SPLIT_SEED,
    DataError,
    has_split,
    load_split,
    prepare_splits,
    read_idx,
    read_images,
    read_labels,
    split_files,
    stratified_holdout,
    write_idx,
    write_split,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def make_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    return images, labels


def write_pair(directory: Path, split: str, count: int = 20, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    images, labels = make_digits(count)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data-idx3-ubyte", "data-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.dtype(">i2"), np.int32, np.float32, np.float64], ids=str)
def test_idx_round_trip(tmp_path: Path, name: str, dtype: np.dtype) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = write_idx(tmp_path / name, array)
    back = read_idx(path)
    assert back.shape == (2, 3, 4)
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6)), st.booleans())
def test_idx_round_trip_any_shape(tmp_path_factory: pytest.TempPathFactory, array: np.ndarray, gz: bool) -> None:
    path = tmp_path_factory.mktemp("idx") / ("a.gz" if gz else "a")
    np.testing.assert_array_equal(read_idx(write_idx(path, array)), array)


def test_gzip_detected_by_content_without_suffix(tmp_path: Path) -> None:
    images, _ = make_digits(3)
    plain = write_idx(tmp_path / "x.gz", images)
    renamed = plain.rename(tmp_path / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(read_images(renamed), images)


@pytest.mark.parametrize("layout", [".", "MNIST/raw", "raw"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_split_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    images, labels = write_pair(tmp_path / layout, "train", gz=gz)
    digits = load_split(tmp_path, "train")
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    assert set(digits.sha256) == {p.name for p in split_files(tmp_path, "train")}
    assert not has_split(tmp_path, "test")


def test_write_split_is_reproducible(tmp_path: Path) -> None:
    write_pair(tmp_path / "a", "train")
    digits = load_split(tmp_path / "a", "train")
    first = [p.read_bytes() for p in write_split(tmp_path / "b", "test", digits)]
    second = [p.read_bytes() for p in write_split(tmp_path / "c", "test", digits)]
    assert first == second
    np.testing.assert_array_equal(load_split(tmp_path / "b", "test").images, digits.images)


# --- corruption: every problem is a DataError naming the file and the problem ----------------------


def corrupt(path: Path, transform: Callable[[bytes], bytes]) -> None:
    """Rewrite the *decompressed* payload of a .gz IDX file through `transform`."""
    path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))


CORRUPTIONS = {
    "bad magic": (
        "train-images-idx3-ubyte.gz",
        lambda b: b"\x00\x00\x07\x03" + b[4:],
        "bad magic number",
    ),
    "not idx": ("train-images-idx3-ubyte.gz", lambda b: b"GIF89a" + b[6:], "bad magic number"),
    "truncated payload": ("train-images-idx3-ubyte.gz", lambda b: b[:-100], "truncated payload"),
    "truncated header": ("train-images-idx3-ubyte.gz", lambda b: b[:10], "truncated header"),
    "empty": ("train-labels-idx1-ubyte.gz", lambda b: b"", "too short"),
    "trailing bytes": ("train-labels-idx1-ubyte.gz", lambda b: b + b"\x00\x01", "2 trailing bytes"),
    "images as labels": (
        "train-labels-idx1-ubyte.gz",
        lambda b: b"\x00\x00\x08\x03" + (1).to_bytes(4, "big") * 3 + b"\x05",
        "expected a label file",
    ),
    "labels as images": (
        "train-images-idx3-ubyte.gz",
        lambda b: b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03",
        "expected an image file",
    ),
    "int labels": (
        "train-labels-idx1-ubyte.gz",
        lambda b: b"\x00\x00\x0c\x01" + (1).to_bytes(4, "big") + (3).to_bytes(4, "big"),
        "expected a label file",
    ),
    "label out of range": (
        "train-labels-idx1-ubyte.gz",
        lambda b: b[: 8 + 7] + b"\x0a" + b[8 + 8 :],
        "label 10 at index 7 is out of range 0..9",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_clear_errors(tmp_path: Path, case: str) -> None:
    name, transform, problem = CORRUPTIONS[case]
    write_pair(tmp_path, "train")
    corrupt(tmp_path / name, transform)
    with pytest.raises(DataError, match=re.escape(problem)) as info:
        load_split(tmp_path, "train")
    assert str(tmp_path / name) in str(info.value)


def test_wrong_image_dimensions(tmp_path: Path) -> None:
    write_pair(tmp_path, "train")
    target = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((20, 27, 30), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{re.escape(str(target))}: images are 27x30, expected 28x28"):
        load_split(tmp_path, "train")


def test_bad_gzip(tmp_path: Path) -> None:
    write_pair(tmp_path, "train")
    target = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip bits inside the deflate stream
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt or truncated gzip") as info:
        load_split(tmp_path, "train")
    assert str(target) in str(info.value)


def test_truncated_gzip(tmp_path: Path) -> None:
    write_pair(tmp_path, "train")
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-500])
    with pytest.raises(DataError, match=rf"{re.escape(str(target))}: corrupt or truncated gzip"):
        load_split(tmp_path, "train")


def test_gz_name_without_gzip_content(tmp_path: Path) -> None:
    write_pair(tmp_path, "train")
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.decompress(target.read_bytes()))
    with pytest.raises(DataError, match=rf"{re.escape(str(target))}: not a gzip file"):
        load_split(tmp_path, "train")


def test_count_mismatch(tmp_path: Path) -> None:
    write_pair(tmp_path, "train", count=20)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(DataError, match=r"20 images but .*train-labels-idx1-ubyte.gz has 19 labels"):
        load_split(tmp_path, "train")


def test_missing_file(tmp_path: Path) -> None:
    write_pair(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing train-labels-idx1-ubyte\[\.gz\] for the train split"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match=r"nope: data directory not found"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(DataError, match=r"absent-idx3-ubyte: file not found"):
        read_images(tmp_path / "absent-idx3-ubyte")


def test_labels_reader_accepts_valid(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_labels(write_idx(tmp_path / "l.gz", labels)), labels)


# --- splits ----------------------------------------------------------------------------------------


def test_stratified_holdout_is_deterministic_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(10, dtype=np.uint8), [801, 902, 793, 826, 784, 690, 811, 856, 755, 782])
    labels = np.random.default_rng(1).permutation(labels)
    val, test, rest = stratified_holdout(labels, [1000, 1000], SPLIT_SEED)
    again = stratified_holdout(labels, [1000, 1000], SPLIT_SEED)
    for a, b in zip((val, test, rest), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (len(val), len(test), len(rest)) == (1000, 1000, 6000)
    assert len(np.unique(np.concatenate([val, test, rest]))) == 8000
    expected = np.bincount(labels) / 8
    assert np.all(np.abs(np.bincount(labels[val]) - expected) <= 1)
    assert np.all(np.abs(np.bincount(labels[test]) - expected) <= 1)
    other = stratified_holdout(labels, [1000, 1000], SPLIT_SEED + 1)[0]
    assert not np.array_equal(val, other)


def test_holdout_larger_than_data_is_an_error() -> None:
    with pytest.raises(DataError, match="cannot hold out 50 digits from only 20"):
        stratified_holdout(np.zeros(20, dtype=np.uint8), [50])


def test_prepare_splits_without_and_with_t10k(tmp_path: Path) -> None:
    write_pair(tmp_path, "train", count=100)
    splits = prepare_splits(tmp_path, val_size=10, test_size=20)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (70, 10, 20)
    assert splits.test_is_holdout
    assert "held out of the train-* files" in splits.test_description
    write_pair(tmp_path, "test", count=30)
    splits = prepare_splits(tmp_path, val_size=10, test_size=20)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 30)
    assert not splits.test_is_holdout and splits.test_indices is None
    assert "t10k" in splits.test_description


def test_committed_fixture(mnist_small_dir: Path) -> None:
    train, test = load_split(mnist_small_dir, "train"), load_split(mnist_small_dir, "test")
    assert (len(train), len(test)) == (500, 300)
    assert np.bincount(test.labels, minlength=10).min() >= 20
    # Real MNIST: white ink on black, background dominates.
    assert np.median(test.images) == 0 and test.images.max() == 255
    assert sum(p.stat().st_size for p in mnist_small_dir.iterdir()) < 300_000


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist for this check")
def test_full_scale_reader_on_fashion_mnist() -> None:
    train, test = load_split(FASHION_MNIST, "train"), load_split(FASHION_MNIST, "test")
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert np.array_equal(np.bincount(train.labels), np.full(10, 6000))
