"""Images the way clients send them, brought back to what the server feeds the model.

A client sends black ink on white paper, of any size, somewhere on a page, as PNG, JPEG or BMP; the
server decodes it and applies the MNIST recipe (`service.recognition.preprocess.to_pixels`). Training
on the recipe's output, not only on the original MNIST arrays, makes the model see exactly what it will
be served: resampling, JPEG artefacts, the recipe's crop threshold and its stretch to full contrast.

Every image gets its own random stream, ``numpy.random.default_rng([seed, stream, index])``, so a
render depends only on the seed and the image's index: parallel or partial runs give the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.recognition.preprocess import RawImage, to_pixels

# How clients send images: PNG and BMP are lossless (decoding gives back the page's exact pixels, so they
# take the faster raw path below), JPEG is not and is really encoded and decoded.
FORMATS = ("PNG", "JPEG", "BMP")
FORMAT_WEIGHTS = (0.5, 0.35, 0.15)
DIGIT_STREAM = 1
TRAIN_RENDER_SEED = 1000
"""Client-style renders trained on: variant v of digit i uses seed TRAIN_RENDER_SEED + v, stream i."""
EVAL_RENDER_SEED = 2000
"""Client-style renders measured on (and that thresholds are chosen on): never the ones trained on."""


def page_to_pixels(page: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A dark-on-light "L" page -> the [28, 28] uint8 array the server would feed the model.

    Paper and ink levels vary (paper 215-255, ink 0-60), then the page is sent as PNG, JPEG or BMP.
    """
    paper, ink = int(rng.integers(215, 256)), int(rng.integers(0, 61))
    lut = [ink + (paper - ink) * v // 255 for v in range(256)]
    page = page.point(lut)
    fmt = FORMATS[int(rng.choice(len(FORMATS), p=FORMAT_WEIGHTS))]
    if fmt == "JPEG":
        out = io.BytesIO()
        page.save(out, format="JPEG", quality=int(rng.integers(50, 96)))
        return to_pixels(out.getvalue())
    # A lossless file decodes to these very pixels: skip the encoder, keep the server's recipe.
    return to_pixels(RawImage(page.width, page.height, "uint8", page.tobytes()))


def digit_page(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28x28 MNIST digit (bright on dark) as black ink on a white page: 28-200 px tall, off-centre."""
    size = int(rng.integers(28, 201))
    resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(0, 2))]
    ink = Image.fromarray(255 - digit).resize((size, size), resample=resample)
    width = size + int(rng.integers(0, size // 2 + 1))
    height = size + int(rng.integers(0, size // 2 + 1))
    page = Image.new("L", (width, height), 255)
    page.paste(ink, (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))))
    return page


def client_style(digits: np.ndarray, seed: int, indices: np.ndarray | None = None) -> np.ndarray:
    """uint8 [N, 28, 28] MNIST digits -> the same digits as sent by a client and preprocessed by the server.

    `indices` (default 0..N-1) number the random streams, so that a digit keeps its render in any subset.
    """
    numbers = np.arange(len(digits)) if indices is None else np.asarray(indices)
    out = np.empty((len(digits), 28, 28), dtype=np.uint8)
    for row, (digit, number) in enumerate(zip(digits, numbers, strict=True)):
        rng = np.random.default_rng([seed, DIGIT_STREAM, int(number)])
        out[row] = page_to_pixels(digit_page(digit, rng), rng)
    return out
