"""The performance work changed how the hot path computes, never what it answers: the batched
preprocessing equals the image-by-image recipe exactly, and a server that stops waiting for company
during sequential traffic still batches concurrent requests."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.batcher import SEQUENTIAL_AFTER
from service.recognition.preprocess import (
    ImageError,
    RawImage,
    mnist_recipe,
    mnist_recipe_batch,
    to_pixel_batch,
    to_pixels,
)
from tests.harness import ServerThread, fixture_digits


def _reference(payloads: list, polarity: str = "light_on_dark") -> np.ndarray:
    arrays_ = [to_pixels(p, ink_polarity=polarity) for p in payloads]
    if len({a.dtype for a in arrays_}) > 1:
        arrays_ = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays_]
    return np.stack(arrays_)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _placed(digits: np.ndarray, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Digits resized and placed at random on a canvas, half of them dark on light."""
    rng = np.random.default_rng(seed)
    out = []
    for digit in digits:
        size = int(rng.integers(4, min(shape) + 1))
        small = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))
        canvas = np.zeros(shape, dtype=np.uint8)
        y, x = int(rng.integers(0, shape[0] - size + 1)), int(rng.integers(0, shape[1] - size + 1))
        canvas[y:y + size, x:x + size] = small
        out.append(canvas if rng.random() < 0.5 else 255 - canvas)
    return np.stack(out)


def test_batched_recipe_equals_the_per_image_recipe_on_real_digits() -> None:
    images, _ = fixture_digits()
    for batch in (images, 255 - images, images // 3 + 40, _placed(images[:100], (40, 52), 1),
                  _placed(images[:100], (28, 28), 2), _placed(images[:50], (12, 64), 3),
                  np.zeros((3, 28, 28), np.uint8), np.full((3, 28, 28), 200, np.uint8)):
        expected = np.stack([mnist_recipe(gray) for gray in batch])
        np.testing.assert_array_equal(mnist_recipe_batch(batch), expected)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(2, 6), st.integers(1, 40), st.integers(1, 40))))
def test_batched_recipe_equals_the_per_image_recipe_on_any_pixels(batch: np.ndarray) -> None:
    expected = np.stack([mnist_recipe(gray) for gray in batch])
    np.testing.assert_array_equal(mnist_recipe_batch(batch), expected)


@pytest.mark.parametrize("polarity", ["light_on_dark", "dark_on_light"])
def test_request_preprocessing_equals_image_by_image(polarity: str) -> None:
    images, _ = fixture_digits()
    raw = [RawImage(28, 28, "uint8", img.tobytes()) for img in images[:40]]
    floats = [RawImage(28, 28, "float32", (img / 255.0).astype("<f4").tobytes()) for img in images[:3]]
    other = [RawImage(30, 20, "uint8", _placed(images[:1], (20, 30), 4)[0].tobytes())]
    pngs = [_png(img) for img in images[:40]]
    big = [_png(_placed(images[:1], (90, 120), 5)[0])]
    for payloads in (raw, pngs, pngs + raw, raw + floats, floats, other + pngs[:3] + big + floats[:1], pngs[:1]):
        got = to_pixel_batch(payloads, ink_polarity=polarity)
        expected = _reference(payloads, polarity)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_request_preprocessing_names_the_first_bad_image() -> None:
    good = RawImage(28, 28, "uint8", bytes(784))
    with pytest.raises(ImageError) as caught:
        to_pixel_batch([good, good, b"not an image", RawImage(28, 28, "uint8", b"short")])
    assert caught.value.index == 2 and caught.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ImageError) as caught:
        to_pixel_batch([good, RawImage(28, 28, "uint8", b"short"), good])
    assert caught.value.index == 1


def test_sequential_calls_stop_waiting_and_concurrent_calls_batch_again() -> None:
    # A batch delay of 1 s: far above what a call takes without it (milliseconds, even on a loaded
    # machine), so "waited" and "did not wait" cannot be confused.
    delay = 1.0
    images, _ = fixture_digits()
    request = digits_pb2.RecognizeRequest(images=[to_image(images[0])])
    with ServerThread(max_batch_delay_ms=delay * 1000) as server, grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        took = []
        for _ in range(SEQUENTIAL_AFTER + 2):
            started = time.perf_counter()
            stub.Recognize(request, timeout=30)
            took.append(time.perf_counter() - started)
        assert min(took[:SEQUENTIAL_AFTER]) >= delay  # a lone call waits for company at first...
        assert max(took[SEQUENTIAL_AFTER:]) < delay / 2  # ...then sequential traffic no longer waits

        # 16 calls that are truly concurrent (queued in the same turn of the server's loop, as calls
        # arriving together are) share one batch again.
        batches = server.server.metrics.batch_size
        before = _count(batches)
        recognizer = server.server.recognizer
        assert recognizer is not None

        async def together() -> list[int]:
            pixels = images[:1]
            done = await asyncio.gather(*[recognizer.recognize_pixels(pixels) for _ in range(16)])
            return [int(r.digits[0]) for r in done]
        assert len(set(server.call(together()))) == 1
        assert _count(batches) - before == 1


def _count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


def _inked_by_labels(ink: np.ndarray) -> np.ndarray:
    """The no-ink test without its fast path: every candidate image labelled."""
    from service.recognition import ink as module

    n, height, width = ink.shape
    flat = np.clip(ink, 0.0, 1.0) if ink.dtype.kind == "f" else ink
    peak = flat.reshape(n, -1).max(axis=1).astype(np.float64)
    result = (peak * 255 if ink.dtype.kind == "f" else peak) >= module.MIN_CONTRAST
    half = (peak / 2).astype(flat.dtype) if ink.dtype.kind == "f" else ((peak.astype(np.int64) + 1) // 2).astype(
        flat.dtype)
    need = max(module.MIN_INK_SIDE, module.MIN_INK_FRACTION * max(height, width))
    if result.any():
        candidates = np.flatnonzero(result)
        result[candidates] = module._labelled(flat[candidates] >= half[candidates][:, None, None], need)
    return result


@settings(max_examples=300, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 30), st.integers(1, 30)),
              elements=st.sampled_from([0, 0, 0, 30, 90, 200, 255])))
def test_the_no_ink_fast_path_answers_as_labelling_every_image(ink: np.ndarray) -> None:
    from service.recognition.ink import inked

    np.testing.assert_array_equal(inked(ink), _inked_by_labels(ink))
    as_float = ink.astype(np.float32) / 255
    np.testing.assert_array_equal(inked(as_float), _inked_by_labels(as_float))


def test_the_no_ink_fast_path_on_real_digits_and_large_pages() -> None:
    from service.recognition.ink import inked

    images, _ = fixture_digits()
    specks = np.zeros((4, 28, 28), np.uint8)
    specks[0, 3:6, 3:6] = 255  # 3x3: under MIN_INK_SIDE
    specks[1, 3:7, 3] = 255  # a 4-pixel stroke: ink
    specks[2, 3:6, 3:6] = 255
    specks[2, 10, 10:14] = 255  # a speck and a stroke
    stack = np.concatenate([images[:64], specks])
    np.testing.assert_array_equal(inked(stack), _inked_by_labels(stack))
    assert inked(images[:64]).all() and inked(specks).tolist() == [False, True, True, False]
    page = np.zeros((2, 600, 500), np.uint8)  # need = 12 pixels: past the fast path, labelled
    page[0, 100:112, 50:52] = 255
    page[1, 100:111, 50:52] = 255
    assert inked(page).tolist() == [True, False]


@pytest.mark.parametrize(("threads", "images", "where"), [(1, 1, "test-server"), (1, 16, "test-server"),
                                                        (1, 17, "inference"), (2, 1, "inference")])
def test_small_batches_on_one_cpu_thread_run_on_the_loop_and_answer_as_on_the_thread(
        threads: int, images: int, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.recognition.batcher import INLINE_MAX_IMAGES, DynamicBatcher

    assert INLINE_MAX_IMAGES == 16
    ran_on: list[str] = []
    infer = DynamicBatcher._infer

    def recording(self, *args):
        ran_on.append(threading.current_thread().name)
        return infer(self, *args)

    monkeypatch.setattr(DynamicBatcher, "_infer", recording)
    digits, labels = fixture_digits()
    pixels = np.resize(digits, (images, 28, 28))
    with ServerThread(threads=threads, max_batch_size=64, max_images_per_request=256) as server:
        recognition = server.call(server.recognizer.recognize_pixels(pixels))
    assert ran_on == [where]
    truth = np.resize(labels, images)
    assert (recognition.digits == truth).mean() > 0.95


def test_a_caller_while_another_is_in_a_handler_is_not_taken_for_sequential_traffic() -> None:
    """Batches that run on the loop end before the next caller can find one running, so the batcher
    also counts the requests in the server's handlers: with another one there, a call waits for
    company again even after sequential traffic (without this, c16 traffic after c1 traffic ran one
    request per batch: 700 instead of 2,200 images/s in digits bench)."""
    delay = 1.0
    images, _ = fixture_digits()
    request = digits_pb2.RecognizeRequest(images=[to_image(images[0])])
    with ServerThread(threads=1, max_batch_delay_ms=delay * 1000) as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        for _ in range(SEQUENTIAL_AFTER + 1):
            stub.Recognize(request, timeout=30)
        started = time.perf_counter()
        stub.Recognize(request, timeout=30)
        assert time.perf_counter() - started < delay / 2  # sequential: no waiting
        metrics = server.server.metrics
        server.call(asyncio.to_thread(lambda: None))  # the loop is idle
        metrics.inflight_requests += 1  # another request in a handler (as a concurrent caller's would be)
        try:
            started = time.perf_counter()
            stub.Recognize(request, timeout=30)
            assert time.perf_counter() - started >= delay  # company is expected again: it waited
        finally:
            metrics.inflight_requests -= 1
