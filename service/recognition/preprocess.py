"""Turn what clients send into model input: decode, the MNIST recipe, normalization from the metadata.

Two kinds of payload arrive: encoded image files (any format Pillow reads, any polarity, size and
position) and raw pixel arrays. Both end as a 28x28 MNIST-convention array (bright ink on black,
digit fitted in 20x20 and centred by its centre of mass); normalization to the model's input space
happens last, in the batcher, with the normalization of the model that runs the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from service.recognition.decode import (
    ImageError,
    ImageTooLarge,
    Opened,
    Payload,
    RawImage,
    load,
    open_payload,
)
from service.recognition.ink import has_ink, inked
from service.recognition.model_metadata import Normalization

__all__ = ["ImageError", "ImageTooLarge", "Payload", "RawImage", "mnist_recipe", "normalize", "open_batch",
           "pixel_batch", "to_pixel_batch", "to_pixels"]

# The MNIST recipe: the digit is scaled to fit a FIT x FIT box inside the SIDE x SIDE image.
FIT = 20
INK_THRESHOLD = 0.2  # of the brightest ink pixel: what counts as ink when cropping
# Same-size decoded images up to this many pixels each go through the recipe as one array (MNIST-sized
# PNGs: one set of array operations per request instead of ~20 per image); bigger ones one by one.
BATCH_RECIPE_PIXELS = 64 * 64
# Bigger images are shrunk to about this many pixels before the recipe (see `shrink`).
MAX_WORKING_PIXELS = 2048 * 2048

def to_pixels(payload: Payload, side: int = 28, max_pixels: int = 25_000_000,
              ink_polarity: str = "light_on_dark") -> np.ndarray:
    """One payload -> a [side, side] MNIST-convention array (uint8 0..255 or float32 0..1).

    Raw pixels of exactly side x side are taken as they are (only normalized later); everything else
    goes through `mnist_recipe`. Raises ImageError / ImageTooLarge naming the problem.
    """
    return pixel_batch([open_payload(payload, max_pixels)], side, ink_polarity)[0]


# The request's work may be stopped between images: a callable that raises when its caller is gone.
Stop = Callable[[], None]


def to_pixel_batch(payloads: Sequence[Payload], side: int = 28, max_pixels: int = 25_000_000,
                   ink_polarity: str = "light_on_dark", max_request_pixels: int = 0,
                   stop: Stop | None = None) -> np.ndarray:
    """A request's payloads -> [n, side, side], exactly ``np.stack([to_pixels(p) for p in payloads])``
    (uint8; float32 0..1 as soon as one raw float32 image is among them), only faster, and in memory
    bounded by one decoded image: `open_batch` then `pixel_batch`.

    The hot path of every request, so no per-image Python beyond what cannot be batched: side x side
    uint8 raw images become one array with one copy. Raises ImageError / ImageTooLarge for the first
    bad image in request order, with its `index` set.
    """
    ready = raw_batch(payloads, side, max_pixels, ink_polarity)
    if ready is not None:
        return ready
    return pixel_batch(open_batch(payloads, max_pixels, max_request_pixels), side, ink_polarity, stop)


def shrink(gray: np.ndarray, max_pixels: int) -> np.ndarray:
    """A grayscale image of more than `max_pixels` reduced by the smallest whole factor that fits, each
    output pixel the mean of a block (what the recipe's own BOX downscaling would do on the way to 20x20
    anyway). The recipe's working copies then stay a few MB however big the image was sent."""
    if gray.size <= max_pixels:
        return gray
    factor = math.ceil(math.sqrt(gray.size / max_pixels))
    return np.asarray(Image.fromarray(gray).reduce(factor))


def raw_batch(payloads: Sequence[Payload], side: int, max_pixels: int, ink_polarity: str) -> np.ndarray | None:
    """The fast path: when every payload is raw side x side uint8 (MNIST-style digits, as load tests and
    batch jobs send them), the request's pixels as one array made with one copy; else None."""
    size = side * side
    if size <= max_pixels and all(type(p) is RawImage and p.width == side and p.height == side
                                  and p.dtype == "uint8" and len(p.data) == size for p in payloads):
        batch = np.frombuffer(b"".join([p.data for p in payloads]), dtype=np.uint8)  # type: ignore[union-attr]
        batch = batch.reshape(len(payloads), side, side)
        return batch if ink_polarity == "light_on_dark" else 255 - batch
    return None


def open_batch(payloads: Sequence[Payload], max_pixels: int, max_request_pixels: int = 0) -> list[Opened]:
    """Every payload's header checked, nothing decoded: the request is refused here, before any work,
    when an image is bad or over `max_pixels`, or when all of them together declare more than
    `max_request_pixels` (0: no request budget)."""
    opened: list[Opened] = []
    total = 0
    try:
        for index, payload in enumerate(payloads):
            try:
                item = open_payload(payload, max_pixels)
            except ImageError as exc:
                exc.index = index
                raise
            opened.append(item)
            total += item.declared
            if max_request_pixels and total > max_request_pixels:
                error = ImageTooLarge(
                    f"the request's images declare {total} pixels up to this one, past the limit of "
                    f"{max_request_pixels} decoded pixels per request (--max-request-pixels); send fewer or "
                    "smaller images per request")
                error.index = index
                raise error
    except ImageError:
        for item in opened:
            if item.image is not None:
                item.image.close()
        raise
    return opened


def pixel_batch(opened: list[Opened], side: int = 28, ink_polarity: str = "light_on_dark",
                stop: Stop | None = None) -> np.ndarray:
    """Opened payloads -> [n, side, side]. Each image is decoded, fitted and dropped before the next
    (small images of one size wait for each other to go through `mnist_recipe_batch` together);
    `stop()` runs before each decode so that a cancelled call stops within one image."""
    plain = ink_polarity == "light_on_dark"
    pixels: list[np.ndarray] = [np.empty(0)] * len(opened)
    small: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for index, item in enumerate(opened):
        if stop is not None:
            stop()
        try:
            array = load(item)
        except ImageError as exc:
            exc.index = index
            for rest in opened[index + 1:]:
                if rest.image is not None:
                    rest.image.close()
            raise
        if array.shape == (side, side) and item.pixels is not None:
            pixels[index] = array if plain else _invert(array)  # raw MNIST-style: ready as sent
            continue
        if array.dtype != np.uint8:
            array = np.rint(array * 255).astype(np.uint8)
        array = shrink(array, MAX_WORKING_PIXELS)
        if array.size <= BATCH_RECIPE_PIXELS:
            small.setdefault(array.shape, []).append((index, array))
        else:
            fitted = mnist_recipe(array, side)  # the decoded image is dropped here
            pixels[index] = fitted if plain else _invert(fitted)
    for items in small.values():
        if len(items) > 1:
            fits = list(mnist_recipe_batch(np.stack([gray for _, gray in items]), side))
        else:
            fits = [mnist_recipe(items[0][1], side)]
        for (index, _), image in zip(items, fits, strict=True):
            pixels[index] = image if plain else _invert(image)
    if len({p.dtype for p in pixels}) > 1:  # mixed uint8 and float32 raw pixels: one scale for all
        pixels = [p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p for p in pixels]
    return np.stack(pixels)


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
    np.maximum(ink, 0, out=ink)  # paper lighter than the border's median is paper too
    peak = int(ink.max())
    out = np.zeros((side, side), dtype=np.uint8)
    if not has_ink(ink):
        return out  # no ink (blank or grey paper, noise, a speck): nothing to centre, and all zeros says so
    mask = ink > peak * INK_THRESHOLD
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
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
