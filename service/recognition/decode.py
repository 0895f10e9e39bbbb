"""What clients send, checked and decoded: image files (only the formats we document) and raw pixels.

Decoding happens in two steps so that a request's cost is known before any pixel is decoded:
`open_payload` reads only headers (an image file's declared size, a raw image's width and height) and
refuses what is over the limits; `load` then decodes one image to 8-bit grayscale. A request's images
are opened together (their declared pixels count against the request's budget), then loaded one at a
time, each dropped once the MNIST recipe has made it 28x28.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# The formats we document, and the only ones opened. Container formats that embed other images
# (ICO, ICNS, CUR, ...) decode what they embed while being opened, before any size can be checked, and
# EPS runs Ghostscript: none of them is ever handed to Pillow. ("PPM" also reads PGM and PBM.)
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

# Magic numbers of formats that are recognised but refused, so that the message can name them.
_MAGIC = ((b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"icns", "ICNS"), (b"%!PS", "EPS"),
          (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"DDS ", "DDS"), (b"8BPS", "PSD"),
          (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"qoif", "QOI"))
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")

DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


class ImageError(ValueError):
    """An image cannot be used; the message says why. Maps to INVALID_ARGUMENT."""

    code = "INVALID_ARGUMENT"
    index: int | None = None  # which image of a request, set by the caller that knows it


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


@dataclass
class Opened:
    """One payload after its header check: a raw pixel view, or an image file not yet decoded."""

    pixels: np.ndarray | None  # raw pixels (a zero-copy view on the payload)
    image: Image.Image | None  # an opened image file; decoded by `load`
    declared: int  # pixels, as the header says

    @property
    def shape(self) -> tuple[int, int]:
        if self.pixels is not None:
            return int(self.pixels.shape[0]), int(self.pixels.shape[1])
        assert self.image is not None
        return self.image.size[1], self.image.size[0]


def open_payload(payload: Payload, max_pixels: int) -> Opened:
    """Check a payload's header against the limits without decoding any pixel.

    Raises ImageError / ImageTooLarge naming the problem."""
    if isinstance(payload, RawImage):
        pixels = raw_pixels(payload, max_pixels)
        return Opened(pixels, None, int(pixels.size))
    image = open_image(payload, max_pixels)
    return Opened(None, image, image.size[0] * image.size[1])


def load(opened: Opened) -> np.ndarray:
    """The payload's pixels: raw ones as sent (uint8 or float32), an image file decoded to uint8 gray."""
    if opened.pixels is not None:
        return opened.pixels
    assert opened.image is not None
    try:
        return load_gray(opened.image)
    finally:
        opened.image.close()
        opened.image = None  # the decoded copy is the caller's now; nothing else keeps it alive


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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image file (its header only) and check its declared size; nothing is decoded yet."""
    if not data:
        raise ImageError("encoded image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit, raises) about huge images; we check ourselves.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot decode image ({len(data)} bytes): {_unaccepted(data)}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image exceeds the decompression-bomb limit: {exc}") from exc
    except Exception as exc:
        # Pillow's format plugins fail on malformed headers with whatever their parsing hits (OSError,
        # ValueError, struct.error, KeyError, ...): every one of them means the bytes are not a usable
        # image, never that the server is broken.
        raise ImageError(f"cannot decode image ({len(data)} bytes): {_reason(exc)}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLarge(
            f"{image.format} image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels (decompression-bomb guard)")
    if width <= 0 or height <= 0:
        image.close()
        raise ImageError(f"{image.format} image has no pixels ({width}x{height})")
    return image


def load_gray(image: Image.Image) -> np.ndarray:
    """Decode an opened image to 8-bit grayscale, transparent areas composited on white."""
    size = image.size
    try:
        with warnings.catch_warnings():
            # Its other warnings (corrupt EXIF, odd TIFF tags) are about the client's file: unstructured
            # stderr lines, one per distinct message, that any client could produce at will.
            warnings.simplefilter("ignore")
            image.load()
            if image.size != size:  # a plugin that decodes something else than it declared
                raise ImageError(f"{image.format} image declared {size[0]}x{size[1]} pixels but decodes to "
                                 f"{image.size[0]}x{image.size[1]}")
            return _grayscale(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image exceeds the decompression-bomb limit: {exc}") from exc
    except MemoryError as exc:
        raise ImageTooLarge("image needs more memory to decode than is available") from exc
    except Exception as exc:
        raise ImageError(f"cannot decode {image.format} image: {_reason(exc)}") from exc


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an image file to 8-bit grayscale, transparent areas composited on white."""
    image = open_image(data, max_pixels)
    try:
        return load_gray(image)
    finally:
        image.close()


@functools.cache
def accepted_formats_text() -> str:
    return ", ".join("WebP" if f == "WEBP" else "PPM/PGM/PBM" if f == "PPM" else f for f in ACCEPTED_FORMATS)


def _unaccepted(data: bytes) -> str:
    """Why Pillow would not open it, naming a format we recognise but do not accept."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return f"{name} is not accepted; send one of {accepted_formats_text()}"
    if data.startswith(_TIFF_MAGIC):
        return "a TIFF whose pixel format Pillow cannot read (e.g. 16-bit floating point samples); " \
               "send 8- or 16-bit integer or 32-bit float samples, or another format"
    return f"not an image in one of the accepted formats ({accepted_formats_text()})"


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
