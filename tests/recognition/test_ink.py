"""The no-ink test: every real digit, however it is sent, has ink; blank, grey and black paper, faint
noise and specks of dust have none, and become all-zero input that the server never runs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.recognition.decode import decode
from service.recognition.ink import MIN_CONTRAST, has_ink, inked
from service.recognition.preprocess import mnist_recipe, to_pixel_batch
from tests.harness import fixture_digits, render


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def blanks() -> dict[str, np.ndarray]:
    """Near-blank pages of the kinds clients really send."""
    rng = np.random.default_rng(5)
    speck = np.full((300, 300), 255, np.uint8)
    speck[120:123, 40:43] = 0  # a 3x3 speck of dust on a white page
    dusty = np.full((400, 300), 250, np.uint8)
    for y, x in rng.integers(0, 290, (12, 2)):
        dusty[y:y + 2, x:x + 2] = 30  # a dozen 2x2 specks
    return {
        "white": np.full((100, 100), 255, np.uint8),
        "black": np.zeros((50, 80), np.uint8),
        "grey paper": np.full((64, 64), 128, np.uint8),
        "faint noise on white": np.clip(235 + rng.normal(0, 6, (200, 200)), 0, 255).astype(np.uint8),
        "faint noise on grey": np.clip(128 + rng.normal(0, 8, (120, 160)), 0, 255).astype(np.uint8),
        "salt noise": np.where(rng.random((150, 150)) < 0.002, 0, 255).astype(np.uint8),
        "speck of dust": speck,
        "dusty page": dusty,
        "28x28 with one dark pixel": np.where(np.arange(784).reshape(28, 28) == 400, 0, 255).astype(np.uint8),
    }


@pytest.mark.parametrize("kind", list(blanks()))
def test_blank_pages_have_no_ink_and_become_all_zero(kind: str) -> None:
    page = blanks()[kind]
    for fmt in ("PNG", "JPEG", "BMP"):
        gray = decode(png(page, fmt), 25_000_000)
        out = mnist_recipe(gray)
        assert not out.any(), f"{kind} as {fmt}: the recipe found ink"
        assert not has_ink(out)


def test_every_real_digit_has_ink_however_it_is_sent() -> None:
    images, _ = fixture_digits()
    assert inked(images).all(), "raw MNIST digits"
    assert inked(images.astype(np.float32) / 255).all(), "raw float32 pixels"
    rendered = [render(img, size, (size + 40, size + 30), (20, 15), fmt)
                for img, (size, fmt) in zip(images[:120], [(28, "PNG"), (90, "JPEG"), (300, "BMP")] * 40,
                                            strict=True)]
    pixels = to_pixel_batch(rendered)
    assert inked(pixels).all(), f"{(~inked(pixels)).sum()} rendered digits lost their ink"


def test_faint_but_real_ink_counts_and_fainter_does_not() -> None:
    images, _ = fixture_digits()
    digit = images[0].astype(np.float32) / 255
    clear = (255 - digit * (MIN_CONTRAST + 20)).astype(np.uint8)  # light pencil on white
    too_faint = (255 - digit * (MIN_CONTRAST - 10)).astype(np.uint8)
    assert mnist_recipe(clear).any() and has_ink(mnist_recipe(clear))
    assert not mnist_recipe(too_faint).any()


def test_an_empty_stack_and_a_stack_of_blanks() -> None:
    assert inked(np.zeros((0, 28, 28), np.uint8)).shape == (0,)
    stack = np.zeros((3, 28, 28), np.uint8)
    stack[1, 5:20, 12:15] = 255  # a stroke: a "1"
    assert inked(stack).tolist() == [False, True, False]
