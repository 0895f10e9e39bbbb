"""The strokes test: real handwritten digits are strokes, a filled silhouette and a grey picture are not;
the packed-row erosions agree with scipy's; the server's batch path (normalized input) and the reader's
path (uint8 pixels) give the same verdicts."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageDraw
from scipy import ndimage

from service.recognition import strokes
from service.recognition.preprocess import mnist_recipe, normalize
from tests.harness import fixture_digits, shipped_metadata

LIMITS = {strokes.FILLED: 0.34, strokes.GREY_INSIDE: 0.25}  # about what training chooses (docs/training.md)


def silhouette(fill: int = 0, outline: int = 0, size: tuple[int, int] = (120, 150)) -> np.ndarray:
    """A dress-like filled trapezoid, dark on white as a photo of it would be, through the recipe."""
    page = Image.new("L", size, 255)
    width, height = size
    ImageDraw.Draw(page).polygon([(width * 0.3, 10), (width * 0.7, 10), (width * 0.95, height - 10),
                                  (width * 0.05, height - 10)], fill=fill, outline=outline, width=3)
    return mnist_recipe(255 - np.asarray(page))


def test_real_digits_are_strokes() -> None:
    images, _ = fixture_digits()
    measured = strokes.features(images)
    assert measured.shape == (len(images), 2)
    assert strokes.unlike_strokes(measured, LIMITS).mean() <= 0.01
    assert np.median(measured[:, 0]) < 0.05  # almost no ink of a digit lies 3 pixels inside it


def test_a_filled_silhouette_is_not_strokes_and_neither_is_a_grey_one() -> None:
    solid, grey = silhouette(), silhouette(fill=190)
    measured = strokes.features(np.stack([solid, grey]))
    assert measured[0, 0] > 0.45  # half of a filled shape lies deep inside it
    assert measured[1, 1] > 0.5  # inside the dark outline, the grey fill is fainter than half the ink
    assert strokes.unlike_strokes(measured, LIMITS).tolist() == [True, True]
    # Each half of the test can be switched off on its own (a threshold of 1 rejects nothing).
    assert strokes.unlike_strokes(measured, {strokes.FILLED: 1.0, strokes.GREY_INSIDE: 1.0}).tolist() == [False,
                                                                                                          False]
    assert strokes.unlike_strokes(measured, {}).tolist() == [False, False]


def test_blank_images_and_wide_images_measure_zero() -> None:
    assert strokes.features(np.zeros((3, 28, 28), np.uint8)).tolist() == [[0.0, 0.0]] * 3
    assert strokes.features(np.full((1, 28, 40), 255, np.uint8)).tolist() == [[0.0, 0.0]]
    assert strokes.features(np.zeros((0, 28, 28), np.uint8)).shape == (0, 2)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, (2, 28, 28), elements=st.sampled_from([0, 20, 90, 160, 255])))
def test_the_packed_erosions_agree_with_scipy(pixels: np.ndarray) -> None:
    peak = pixels.reshape(2, -1).max(axis=1)[:, None, None].astype(np.float32)
    ink = (pixels >= peak * np.float32(strokes.INK_LEVEL)) & (peak > 0)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    core3 = ndimage.binary_erosion(ink, structure=structure, border_value=0)
    core5 = ndimage.binary_erosion(ink, structure=np.pad(np.ones((1, 5, 5), bool), ((1, 1), (0, 0), (0, 0))),
                                   border_value=0)
    grey = core3 & (pixels < peak * np.float32(strokes.GREY_BELOW))
    filled = core5.sum(axis=(1, 2)) / np.maximum(ink.sum(axis=(1, 2)), 1)
    grey_inside = grey.sum(axis=(1, 2)) / np.maximum(core3.sum(axis=(1, 2)), 1)
    np.testing.assert_allclose(strokes.features(pixels), np.stack([filled, grey_inside], axis=1))


def test_normalized_input_gives_the_verdicts_of_the_pixels() -> None:
    """The batcher measures the model's normalized input; training and the reader measure uint8 pixels."""
    from service.recognition.model_metadata import ModelMetadata

    norm = ModelMetadata.from_props(shipped_metadata()).normalization
    images, _ = fixture_digits()
    pictures = np.concatenate([images, np.stack([silhouette(), silhouette(fill=190)])])
    direct = strokes.features(pictures)
    batched = strokes.features(normalize(pictures, norm)[:, 0], paper=-norm.mean / norm.std)
    np.testing.assert_allclose(batched, direct, atol=0.02)
    assert (strokes.unlike_strokes(batched, LIMITS) == strokes.unlike_strokes(direct, LIMITS)).all()


def test_thresholds_are_chosen_on_digits_alone() -> None:
    images, _ = fixture_digits()
    measured = strokes.features(images)
    limits = strokes.choose(measured, 0.02)
    assert set(limits) == set(strokes.KEYS)
    assert strokes.unlike_strokes(measured, limits).mean() <= 0.02
