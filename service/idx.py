"""The MNIST IDX format reader (plain or gzip), shared by `digits loadtest` and the training package.

It lives in `service` because `service` must not import `training` (training imports it instead). The
reader never trusts a file: the magic number, the dimensions and the payload length are checked, and
every problem is an `IdxError` naming the file, never a numpy or zlib traceback.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
# Where the image/label pairs may be found, in order of preference.
PAIRS = (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
         ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))


class IdxError(ValueError):
    """An IDX file is missing, truncated, corrupt or not IDX; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    """The decompressed content of `path`; gzip is recognised by suffix or by its magic bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{path}: file not found") from None
    except OSError as exc:
        raise IdxError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC:
        if raw[:2] != _GZIP_MAGIC:
            raise IdxError(f"{path}: not a gzip file (bad gzip header) although the name ends in .gz")
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            # EOFError: the compressed stream ends early; BadGzipFile/zlib.error: corrupt data or CRC.
            raise IdxError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read any IDX file (raw or .gz) into a native-endian numpy array, validating header and length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise IdxError(f"{path}: bad magic number 0x{data[:4].hex()} (not an IDX file)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{path}: truncated header ({len(data)} bytes, IDX header needs {header_len})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise IdxError(
            f"{path}: truncated payload: header says shape {list(shape)} ({expected} bytes), file holds {actual} bytes"
        )
    if actual > expected:
        raise IdxError(f"{path}: {actual - expected} trailing bytes after the payload of shape {list(shape)}")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


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
