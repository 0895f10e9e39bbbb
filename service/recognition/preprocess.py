"""Turn what clients send into model input: decode, the MNIST recipe, normalization from the metadata.

Two kinds of payload arrive: encoded image files (any format Pillow reads, any polarity, size and
position) and raw pixel arrays. Both end as a 28x28 MNIST-convention array (bright ink on black,
digit fitted in 20x20 and centred by its centre of mass); normalization to the model's input space
happens last, in the batcher, with the normalization of the model that runs the batch.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.recognition.ink import inked
from service.recognition.model_metadata import Normalization

# The MNIST recipe: the digit is scaled to fit a FIT x FIT box inside the SIDE x SIDE image.
FIT = 20
INK_THRESHOLD = 0.2  # of the brightest ink pixel: what counts as ink when cropping
# Same-size decoded images up to this many pixels each go through the recipe as one array (MNIST-sized
# PNGs: one set of array operations per request instead of ~20 per image); bigger ones one by one.
BATCH_RECIPE_PIXELS = 64 * 64

DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


class ImageError(ValueError):
    """An image cannot be used; the message says why. Maps to INVALID_ARGUMENT."""

    code = "INVALID_ARGUMENT"
    index: int | None = None  # which image of a request, set by `to_pixel_batch`


class ImageTooLarge(ImageError):
    """An image exceeds a size limit. Maps to RESOURCE_EXHAUSTED."""

    code = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class RawImage:
    """Uncompressed grayscale pixels, row-major: uint8 0..255 or float32 0..1."""

    width: int
    height: int
    dtype: str
    data: bytes


Payload = bytes | RawImage  # bytes: an encoded image file


def to_pixels(payload: Payload, side: int = 28, max_pixels: int = 25_000_000,
              ink_polarity: str = "light_on_dark") -> np.ndarray:
    """One payload -> a [side, side] MNIST-convention array (uint8 0..255 or float32 0..1).

    Raw pixels of exactly side x side are taken as they are (only normalized later); everything else
    goes through `mnist_recipe`. Raises ImageError / ImageTooLarge naming the problem.
    """
    array, ready = _source(payload, side, max_pixels)
    fitted = array if ready else mnist_recipe(array, side)
    return fitted if ink_polarity == "light_on_dark" else _invert(fitted)


def _source(payload: Payload, side: int, max_pixels: int) -> tuple[np.ndarray, bool]:
    """(array, ready): raw side x side pixels are ready as sent; anything else comes back as 8-bit
    grayscale that still needs `mnist_recipe`."""
    if isinstance(payload, RawImage):
        pixels = raw_pixels(payload, max_pixels)
        if pixels.shape == (side, side):
            return pixels, True
        return (pixels if pixels.dtype == np.uint8 else np.rint(pixels * 255).astype(np.uint8)), False
    return decode(payload, max_pixels), False


def to_pixel_batch(payloads: Sequence[Payload], side: int = 28, max_pixels: int = 25_000_000,
                   ink_polarity: str = "light_on_dark") -> np.ndarray:
    """A request's payloads -> [n, side, side], exactly ``np.stack([to_pixels(p) for p in payloads])``
    (uint8; float32 0..1 as soon as one raw float32 image is among them), only faster.

    The hot path of every request, so no per-image Python beyond what cannot be batched: side x side
    uint8 raw images become one array with one copy, and small decoded images of one size go through
    `mnist_recipe_batch` together. Raises ImageError / ImageTooLarge for the first bad image in request
    order, with its `index` set.
    """
    plain = ink_polarity == "light_on_dark"
    size = side * side
    if size <= max_pixels and all(type(p) is RawImage and p.width == side and p.height == side
                                  and p.dtype == "uint8" and len(p.data) == size for p in payloads):
        batch = np.frombuffer(b"".join([p.data for p in payloads]), dtype=np.uint8)  # type: ignore[union-attr]
        batch = batch.reshape(len(payloads), side, side)
        return batch if plain else 255 - batch
    pixels: list[np.ndarray] = [np.empty(0)] * len(payloads)
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for index, payload in enumerate(payloads):
        try:
            array, ready = _source(payload, side, max_pixels)
        except ImageError as exc:
            exc.index = index
            raise
        if ready:
            pixels[index] = array if plain else _invert(array)
        else:
            by_shape.setdefault(array.shape, []).append((index, array))
    for shape, items in by_shape.items():
        if len(items) > 1 and shape[0] * shape[1] <= BATCH_RECIPE_PIXELS:
            fitted = list(mnist_recipe_batch(np.stack([gray for _, gray in items]), side))
        else:
            fitted = [mnist_recipe(gray, side) for _, gray in items]
        for (index, _), image in zip(items, fitted, strict=True):
            pixels[index] = image if plain else _invert(image)
    if len({p.dtype for p in pixels}) > 1:  # mixed uint8 and float32 raw pixels: one scale for all
        pixels = [p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p for p in pixels]
    return np.stack(pixels)


def raw_pixels(raw: RawImage, max_pixels: int) -> np.ndarray:
    """A zero-copy [height, width] view on `raw.data`, after checking sizes and values."""
    dtype = DTYPES.get(raw.dtype)
    if dtype is None:
        raise ImageError(f"raw pixels dtype must be uint8 or float32, got {raw.dtype!r}")
    if raw.width <= 0 or raw.height <= 0:
        raise ImageError(f"raw pixels need width and height >= 1, got {raw.width}x{raw.height}")
    if raw.width * raw.height > max_pixels:
        raise ImageTooLarge(
            f"raw image of {raw.width}x{raw.height} = {raw.width * raw.height} pixels exceeds the limit "
            f"of {max_pixels} pixels"
        )
    expected = raw.width * raw.height * dtype.itemsize
    if len(raw.data) != expected:
        raise ImageError(
            f"raw pixels data is {len(raw.data)} bytes, but {raw.width}x{raw.height} {raw.dtype} needs {expected}"
        )
    pixels = np.frombuffer(raw.data, dtype=dtype).reshape(raw.height, raw.width)
    if dtype != np.uint8:
        if not np.isfinite(pixels).all():
            raise ImageError("raw float32 pixels contain NaN or infinity")
        if pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ImageError(
                f"raw float32 pixels must lie in [0, 1] (pixel/255), found {pixels.min():g}..{pixels.max():g}"
            )
    return pixels


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an image file to 8-bit grayscale, transparent areas composited on white."""
    if not data:
        raise ImageError("encoded image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit, raises) about huge images; we check ourselves.
            # Its other warnings (corrupt EXIF, odd TIFF tags) are about the client's file: unstructured
            # stderr lines, one per distinct message, that any client could produce at will.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=decodable_formats())
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{image.format} image of {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} pixels (decompression-bomb guard)"
                )
            if width <= 0 or height <= 0:
                raise ImageError(f"{image.format} image has no pixels ({width}x{height})")
            image.load()
            return _grayscale(image)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot decode image ({len(data)} bytes): not a format Pillow recognises") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image exceeds the decompression-bomb limit: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLarge(f"image ({len(data)} bytes) needs more memory to decode than is available") from exc
    except Exception as exc:
        # Pillow's format plugins fail on malformed files with whatever their parsing hits (OSError,
        # ValueError, struct.error, NotImplementedError from DDS, KeyError, ...): every one of them
        # means the bytes are not a usable image, never that the server is broken.
        raise ImageError(f"cannot decode image ({len(data)} bytes): {_reason(exc)}") from exc


# Formats whose decoder hands the bytes to another program: Pillow's EPS plugin runs Ghostscript
# (where installed) on the PostScript it is given. Never on a client's upload.
EXCLUDED_FORMATS = frozenset({"EPS"})


@functools.cache
def decodable_formats() -> tuple[str, ...]:
    """Every format Pillow can open, less EXCLUDED_FORMATS."""
    Image.init()
    return tuple(f for f in Image.OPEN if f not in EXCLUDED_FORMATS)


def _grayscale(image: Image.Image) -> np.ndarray:
    """A loaded image as 8-bit grayscale, transparent areas composited on white."""
    if image.mode in ("L", "1") and "transparency" not in image.info:
        # An 8-bit grayscale file (the common case) is used as decoded: convert() would copy it.
        return np.asarray(image if image.mode == "L" else image.convert("L"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return _wide_to_uint8(np.asarray(image, dtype=np.float64))
    # Anything with (or possibly with) alpha: composite on white, as a page or canvas would show it.
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("L"))


def mnist_recipe(gray: np.ndarray, side: int = 28) -> np.ndarray:
    """Any grayscale image of one digit -> [side, side] uint8, MNIST convention.

    Detect polarity (the border is background) and invert so ink is bright, remove the background
    level, crop to the ink's bounding box, scale to fit FIT x FIT keeping the aspect ratio, and paste
    with the centre of mass at the centre.
    """
    border = np.concatenate((gray[0], gray[-1], gray[:, 0], gray[:, -1]))
    # The median of the 2 * (H + W) border values, i.e. int(np.median(border)) without its overhead
    # (a quarter of this function's time on a 28x28 image).
    middle = border.size // 2
    low, high = np.partition(border, (middle - 1, middle))[middle - 1:middle + 1]
    background = (int(low) + int(high)) // 2
    # Dark ink on a light page (paper, canvas) is inverted so ink is bright, as in MNIST.
    ink = background - gray.astype(np.int16) if background > 127 else gray.astype(np.int16) - background
    peak = int(ink.max())
    out = np.zeros((side, side), dtype=np.uint8)
    if not inked(np.clip(ink, 0, None)[None])[0]:
        return out  # no ink (blank or grey paper, noise, a speck): nothing to centre, and all zeros says so
    mask = ink > peak * INK_THRESHOLD
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    crop = np.clip(ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 0, None)
    crop = (crop * (255.0 / peak)).astype(np.uint8)
    height, width = crop.shape
    fit = min(FIT, side)
    scale = fit / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        crop = np.asarray(Image.fromarray(crop).resize((new_w, new_h), resample=resample))
        # Downscaling averages thin strokes into grey; MNIST strokes peak at full intensity.
        top_value = int(crop.max())
        if 0 < top_value < 255:
            crop = (crop.astype(np.uint16) * 255 // top_value).astype(np.uint8)
    total = float(crop.sum())
    if total <= 0:
        return out
    com_y = float(crop.sum(axis=1) @ np.arange(new_h)) / total
    com_x = float(crop.sum(axis=0) @ np.arange(new_w)) / total
    centre = (side - 1) / 2.0
    top = min(max(round(centre - com_y), 0), side - new_h)
    left = min(max(round(centre - com_x), 0), side - new_w)
    out[top:top + new_h, left:left + new_w] = crop
    return out


def mnist_recipe_batch(grays: np.ndarray, side: int = 28) -> np.ndarray:
    """`mnist_recipe` for [n, H, W] images of one size at once, with the same result image by image.

    Polarity, background, crop box, scaling to 0..255, the fit check and the centre of mass are array
    operations over the whole batch; only the paste, and the resize of a digit that does not already
    fit FIT x FIT (MNIST-style input already does), are per image. Meant for small images: it holds a
    float64 copy of the batch.
    """
    n, height, width = grays.shape
    out = np.zeros((n, side, side), dtype=np.uint8)
    border = np.concatenate((grays[:, 0], grays[:, -1], grays[:, :, 0], grays[:, :, -1]), axis=1)
    middle = border.shape[1] // 2  # 2 * (H + W) values: the median is the mean of the middle two
    ordered = np.partition(border, (middle - 1, middle), axis=1)
    background = ((ordered[:, middle - 1].astype(np.int16) + ordered[:, middle]) // 2)[:, None, None]
    gray16 = grays.astype(np.int16)
    ink = np.where(background > 127, background - gray16, gray16 - background)
    peak = ink.reshape(n, -1).max(axis=1)
    mask = ink > (peak * INK_THRESHOLD)[:, None, None]
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    top_ink, left_ink = rows.argmax(axis=1), cols.argmax(axis=1)
    h = height - rows[:, ::-1].argmax(axis=1) - top_ink
    w = width - cols[:, ::-1].argmax(axis=1) - left_ink
    scaled = (np.clip(ink, 0, None) * (255.0 / np.maximum(peak, 1))[:, None, None]).astype(np.uint8)
    fit = min(FIT, side)
    factor = fit / np.maximum(h, w)
    # np.rint rounds half to even, as Python's round() in mnist_recipe does.
    resize = (np.maximum(1, np.rint(w * factor)) != w) | (np.maximum(1, np.rint(h * factor)) != h)
    # Centre of mass of each crop box, in exact integer arithmetic, for the digits that need no resize.
    inside = ((np.arange(height) >= top_ink[:, None]) & (np.arange(height) < (top_ink + h)[:, None]))[:, :, None] \
        & ((np.arange(width) >= left_ink[:, None]) & (np.arange(width) < (left_ink + w)[:, None]))[:, None, :]
    boxed = np.where(inside, scaled, 0).astype(np.int64)
    row_mass, col_mass = boxed.sum(axis=2), boxed.sum(axis=1)
    total = row_mass.sum(axis=1)
    safe = np.maximum(total, 1)
    com_y = (row_mass @ np.arange(height) - top_ink * total) / safe
    com_x = (col_mass @ np.arange(width) - left_ink * total) / safe
    centre = (side - 1) / 2.0
    top = np.minimum(np.maximum(np.rint(centre - com_y), 0), side - h).astype(np.int64)
    left = np.minimum(np.maximum(np.rint(centre - com_x), 0), side - w).astype(np.int64)
    for i in np.flatnonzero(inked(np.clip(ink, 0, None))):
        y, x, hi, wi = int(top_ink[i]), int(left_ink[i]), int(h[i]), int(w[i])
        if resize[i]:
            out[i] = mnist_recipe(grays[i], side)
        else:
            out[i, top[i]:top[i] + hi, left[i]:left[i] + wi] = scaled[i, y:y + hi, x:x + wi]
    return out


def normalize(pixels: np.ndarray, norm: Normalization, out: np.ndarray | None = None) -> np.ndarray:
    """Map MNIST-convention pixels [N, H, W] to model input [N, 1, H, W] float32.

    uint8 pixels are 0..255; float32 pixels are already ``pixel/255`` in 0..1.
    Writes into `out` when given (the batcher's preallocated array) to avoid a copy.
    """
    n, h, w = pixels.shape
    if out is None:
        out = np.empty((n, 1, h, w), dtype=np.float32)
    target = out.reshape(n, h, w)
    scale = norm.scale if pixels.dtype == np.uint8 else 1.0
    # (p*scale - mean)/std == p*(scale/std) - mean/std: one multiply and one subtract over the batch.
    np.multiply(pixels, np.float32(scale / norm.std), out=target, casting="unsafe")
    target -= np.float32(norm.mean / norm.std)
    return out


def _invert(pixels: np.ndarray) -> np.ndarray:
    return (255 - pixels) if pixels.dtype == np.uint8 else (1.0 - pixels).astype(np.float32)


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():  # a float TIFF can hold anything; NaN would become arbitrary ink
        raise ImageError("floating-point image contains NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return ((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    """Why a decoder failed, without the file's own bytes: some messages quote them ("Token too long in
    file header: b'...'", "could not convert string to float: '...'"), and this text reaches the
    request log, which never holds image content."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    if reason[:2] in ("b'", 'b"'):  # a message built as bytes: its repr
        reason = reason[2:-1]
    reason = _QUOTED.sub("'…'", reason.split(": ", 1)[0])
    return reason[:200] or type(exc).__name__


_QUOTED = re.compile(r"b?'[^']*'?|b?\"[^\"]*\"?")
