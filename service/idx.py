"""A tiny reader for MNIST IDX files (plain or gzip), for `digits loadtest` on a server install.

`service` must not import `training` (which owns the strict reader used for training), so this is a
deliberately small, still careful copy: magic number, dimensions and payload length are checked and
every problem is an `IdxError` naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_DTYPES: dict[int, np.dtype] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
# Where the image/label pairs may be found, in order of preference.
PAIRS = (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
         ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))


class IdxError(ValueError):
    """An IDX file is missing, truncated or not IDX; the message names the file."""


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` is decompressed)."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{path}: cannot read: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise IdxError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise IdxError(f"{path}: payload is {len(data) - header} bytes, shape {shape} needs {expected - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_pair(folder: Path) -> tuple[Path, Path | None] | None:
    """The (images, labels-or-None) IDX files in `folder`, test split first; None when there are none."""
    for images, labels in PAIRS:
        found_images = _first_existing(folder, images)
        if found_images is not None:
            return found_images, _first_existing(folder, labels)
    return None


def load_digits(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W], labels [N] or None) from the IDX pair in `folder`."""
    pair = find_pair(folder)
    if pair is None:
        raise IdxError(f"{folder}: no t10k-images-idx3-ubyte[.gz] or train-images-idx3-ubyte[.gz]")
    images = read_idx(pair[0])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxError(f"{pair[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    labels = None
    if pair[1] is not None:
        labels = read_idx(pair[1])
        if labels.shape != (images.shape[0],):
            raise IdxError(f"{pair[1]}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


def _first_existing(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None
