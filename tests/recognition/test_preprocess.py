"""The MNIST recipe on real digits: polarity, cropping, scaling and centring give back MNIST-like input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.recognition.decode import ImageError, ImageTooLarge, RawImage, decode
from service.recognition.model_metadata import Normalization
from service.recognition.preprocess import mnist_recipe, normalize, to_pixels
from tests.harness import fixture_digits, render

DIGITS, _ = fixture_digits()


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    total = img.sum()
    ys, xs = np.indices(img.shape)
    return float((ys * img).sum() / total), float((xs * img).sum() / total)


def test_recipe_output_is_centred_and_fits_20x20() -> None:
    for digit in DIGITS[:50]:
        page = render(digit, size=150, canvas=(400, 300), offset=(230, 20))  # dark ink, off-centre
        out = to_pixels(page)
        assert out.shape == (28, 28) and out.dtype == np.uint8
        cy, cx = centre_of_mass(out.astype(np.float64))
        assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0
        rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
        assert rows[-1] - rows[0] < 20 and cols[-1] - cols[0] < 20
        assert out.max() == 255  # ink is bright, as in MNIST


def test_polarity_does_not_matter() -> None:
    digit = DIGITS[3]
    dark_on_light = to_pixels(render(digit, 84, (120, 120), (10, 30)))
    light_on_dark = Image.new("L", (120, 120), 0)
    light_on_dark.paste(Image.fromarray(digit).resize((84, 84), Image.Resampling.BILINEAR), (10, 30))
    buf = io.BytesIO()
    light_on_dark.save(buf, format="PNG")
    assert np.abs(dark_on_light.astype(int) - to_pixels(buf.getvalue()).astype(int)).mean() < 3


def test_recipe_on_mnist_digit_is_close_to_the_original() -> None:
    # MNIST digits are already fitted and centred, so the recipe should change them very little.
    diffs = [np.abs(mnist_recipe(d).astype(int) - d.astype(int)).mean() for d in DIGITS[:100]]
    assert float(np.median(diffs)) < 20


def test_raw_28x28_is_only_normalized_and_other_sizes_are_resized() -> None:
    digit = DIGITS[0]
    same = to_pixels(RawImage(28, 28, "uint8", digit.tobytes()))
    assert np.array_equal(same, digit)
    big = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BILINEAR))
    resized = to_pixels(RawImage(56, 56, "uint8", big.tobytes()))
    assert resized.shape == (28, 28)
    assert np.abs(resized.astype(int) - digit.astype(int)).mean() < 25


def test_blank_page_gives_blank_input() -> None:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buf, format="PNG")
    assert not to_pixels(buf.getvalue()).any()


def test_normalize_uses_the_metadata() -> None:
    norm = Normalization(scale=1 / 255, mean=0.5, std=0.25)
    pixels = np.array([[[0, 255]]], dtype=np.uint8)
    out = normalize(pixels, norm)
    assert out.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(out.ravel(), [-2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(normalize(pixels.astype(np.float32) / 255, norm), out, atol=1e-6)


def test_decode_errors_are_clear() -> None:
    with pytest.raises(ImageError, match="not an image in one of the accepted formats"):
        decode(b"hello", 1000)
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    with pytest.raises(ImageTooLarge, match="exceeds the limit of 5000 pixels"):
        decode(buf.getvalue(), 5000)
    with pytest.raises(ImageError, match=r"truncated|cannot decode"):
        decode(buf.getvalue()[:60], 1_000_000)
