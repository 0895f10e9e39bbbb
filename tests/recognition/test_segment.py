"""The segmenter on its own (no model): components, specks, merges, cuts, boxes and its bounds."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.perf.reading.numbers import KINDS, compose
from service.perf.reading.numbers import box_iou as iou
from service.recognition.decode import decode
from service.recognition.reading import segment
from tests.harness import fixture_digits


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return fixture_digits("t10k")


def strokes(lines: list[list[tuple[int, int]]], size: tuple[int, int] = (140, 110), width: int = 9) -> np.ndarray:
    """Black strokes on white, as a canvas sends them."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    for line in lines:
        draw.line(line, fill=0, width=width, joint="curve")
    return np.asarray(image)


def test_blank_and_flat_images_have_no_candidates() -> None:
    for gray in (np.full((40, 90), 255, np.uint8), np.zeros((40, 90), np.uint8), np.full((5, 5), 128, np.uint8)):
        assert segment.segment(gray).candidates == ()


@pytest.mark.parametrize("kind", KINDS)
def test_every_digit_of_every_kind_is_covered_by_a_candidate_box(digits: tuple[np.ndarray, np.ndarray],
                                                                  kind: str) -> None:
    """The right candidates exist: every true digit's box is matched by some candidate's box."""
    rng = np.random.default_rng([4, KINDS.index(kind)])
    for _ in range(10):
        number = compose(*digits, kind, rng)
        found = segment.segment(decode(number.png, 10**8))
        for x, y, w, h in number.boxes:
            assert max(iou((x, y, w, h), c.box) for c in found.candidates) >= 0.7, (kind, number.text)


def test_specks_are_dropped(digits: tuple[np.ndarray, np.ndarray]) -> None:
    number = compose(*digits, "spaced", np.random.default_rng(5), length=3)
    gray = decode(number.png, 10**8).copy()
    clean = segment.segment(gray)
    rng = np.random.default_rng(6)
    blank = gray > 250
    dots = 0
    for y, x in zip(rng.integers(4, gray.shape[0] - 6, 300), rng.integers(4, gray.shape[1] - 6, 300), strict=True):
        if dots < 30 and blank[y - 4:y + 6, x - 4:x + 6].all():  # dust on the paper, off the strokes
            gray[y:y + 2, x:x + 2] = 0
            dots += 1
    assert dots == 30
    noisy = segment.segment(gray)
    assert len(noisy.drops) == len(clean.drops)  # the same components: no speck became one
    assert [c.box for c in noisy.candidates] == [c.box for c in clean.candidates]


def test_pieces_of_one_digit_are_joined_by_a_candidate() -> None:
    """A 5 whose bar is detached and a 4 in two strokes: two components, and one candidate holds both."""
    five = strokes([[(52, 14), (90, 12)], [(50, 26), (46, 52), (66, 46), (82, 58), (82, 78), (66, 92), (44, 86)]])
    four = strokes([[(62, 12), (38, 62), (74, 62)], [(84, 18), (84, 98)]])
    for gray in (five, four):
        found = segment.segment(gray)
        assert len(found.drops) == 2
        whole = [c for c in found.candidates if c.start == 0 and c.end == found.nodes - 1]
        assert len(whole) == 1
        ink = np.argwhere(gray < 128)
        box = whole[0].box
        assert (box.y, box.x) == tuple(ink.min(axis=0)) and (box.y + box.height, box.x + box.width) == tuple(
            ink.max(axis=0) + 1)


def test_touching_digits_get_a_cut_between_them(digits: tuple[np.ndarray, np.ndarray]) -> None:
    number = compose(*digits, "touching", np.random.default_rng(7), length=2)
    found = segment.segment(decode(number.png, 10**8))
    assert len(found.drops) == 1  # one component: the two digits touch
    assert max(found.cut_strokes) > 0
    for x, y, w, h in number.boxes:  # each digit alone is a candidate
        assert max(iou((x, y, w, h), c.box) for c in found.candidates) >= 0.7


def test_boxes_are_in_the_pixels_of_the_image_as_sent(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Large photos are worked on at a smaller scale; the boxes still fit the image as sent."""
    number = compose(*digits, "spaced", np.random.default_rng(8), length=3)
    small = decode(number.png, 10**8)
    big = np.asarray(Image.fromarray(small).resize((small.shape[1] * 6, small.shape[0] * 6)))
    found = segment.segment(big)
    for x, y, w, h in number.boxes:
        assert max(iou((6 * x, 6 * y, 6 * w, 6 * h), c.box) for c in found.candidates) >= 0.8


def test_a_20000_by_60_strip_is_read_in_bounded_time(digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = digits
    strip = np.full((60, 20_000), 255, np.uint8)
    for i, x in enumerate(range(100, 19_900, 1_000)):  # 20 digits spread along it
        digit = np.asarray(Image.fromarray(images[i]).resize((48, 48)))
        strip[6:54, x:x + 48] = 255 - digit
    started = time.perf_counter()
    found = segment.segment(strip)
    assert time.perf_counter() - started < 5
    assert len(found.drops) >= 20
    assert len(found.candidates) <= segment.MAX_CANDIDATES


def test_the_candidates_per_image_are_capped() -> None:
    """Scribbles, noise and long touching runs never send more than MAX_CANDIDATES crops."""
    rng = np.random.default_rng(9)
    wave = strokes([[(x, 40 + int(30 * np.sin(x / 7))) for x in range(5, 2_000, 3)]], size=(2_000, 90), width=5)
    noise = np.where(rng.random((80, 3_000)) < 0.3, 0, 255).astype(np.uint8)
    blobs = np.full((60, 4_000), 255, np.uint8)
    for x in range(10, 3_990, 12):
        blobs[10:50, x:x + 7] = 0
    for gray in (wave, noise, blobs):
        found = segment.segment(gray)
        assert len(found.candidates) <= segment.MAX_CANDIDATES
        assert len(found.drops) <= segment.MAX_COMPONENTS
