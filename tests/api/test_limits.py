"""Limits that protect the process, beyond the per-request cases in test_server_bad_input.py:
concurrent streams per connection, the pixel limit on real encoded images of every common format,
hostile tensor values, and every limit set through the real CLI's environment variables (whose JSON
logs must not quote what clients sent)."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port, render, wait_serving

DIGITS, _ = fixture_digits()
GOOD = to_image(DIGITS[0])
MAX_PIXELS = 250_000  # 500 x 500


def own_connection(target: str) -> grpc.Channel:
    # Channels to one target share a connection by default; the stream limit is per connection.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def recognize(channel: grpc.Channel, images: list[digits_pb2.Image]) -> digits_pb2.RecognizeResponse:
    return digits_pb2_grpc.DigitRecognizerStub(channel).Recognize(digits_pb2.RecognizeRequest(images=images),
                                                                  timeout=10)


@pytest.mark.parametrize(("limit", "third_waits"), [(2, True), (3, False)], ids=["limit-2", "limit-3"])
def test_concurrent_streams_per_connection_are_capped(limit: int, third_waits: bool) -> None:
    """Two open streams on a connection limited to 2: a third call waits for a free slot (HTTP/2
    SETTINGS_MAX_CONCURRENT_STREAMS) instead of reaching the server; with a limit of 3 it does not."""
    with ServerThread(max_concurrent_streams=limit) as running, \
            own_connection(running.target) as channel, own_connection(running.target) as other:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        feeds: list[queue.Queue[digits_pb2.StreamRequest | None]] = [queue.Queue(), queue.Queue()]
        streams = [stub.RecognizeStream(iter(feed.get, None), timeout=30) for feed in feeds]
        for feed, stream in zip(feeds, streams, strict=True):
            feed.put(digits_pb2.StreamRequest(id="open", image=GOOD))
            assert next(stream).id == "open"  # this stream is established on the server
        third = stub.Recognize.future(digits_pb2.RecognizeRequest(images=[GOOD]), timeout=30)
        try:
            # The server is idle and answers another connection at once...
            assert len(recognize(other, [GOOD]).predictions) == 1
            if third_waits:
                # ...but the third call on the full connection is held back by the client's HTTP/2 layer:
                # still unanswered after the other connection got three more answers.
                for _ in range(3):
                    assert len(recognize(other, [GOOD]).predictions) == 1
                assert not third.done()
                feeds[0].put(None)  # closing one stream frees a slot
                assert [r.id for r in streams[0]] == []
            assert len(third.result(timeout=10).predictions) == 1
        finally:
            for feed in feeds:
                feed.put(None)
            third.cancel()


def _encoded(width: int, height: int, fmt: str) -> bytes:
    """A real digit on a white page of width x height, encoded as `fmt`."""
    page = Image.new("L", (width, height), 255)
    side = min(width, height) // 2
    digit = Image.fromarray(255 - DIGITS[0]).resize((side, side))
    page.paste(digit, ((width - side) // 2, (height - side) // 2))
    out = io.BytesIO()
    page.convert("RGB" if fmt == "JPEG" else "L").save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerThread]:
    with ServerThread(max_image_pixels=MAX_PIXELS, max_batch_delay_ms=100) as running:
        yield running


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_pixel_limit_applies_to_encoded_images_of_every_format(limited, fmt: str) -> None:
    with grpc.insecure_channel(limited.target) as channel:
        at_limit = recognize(channel, [digits_pb2.Image(encoded=_encoded(500, 500, fmt))])
        assert len(at_limit.predictions) == 1
        with pytest.raises(grpc.RpcError) as caught:
            recognize(channel, [GOOD, digits_pb2.Image(encoded=_encoded(501, 500, fmt))])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"image 1: {fmt}" in caught.value.details()
    assert "501x500 = 250500 pixels exceeds the limit of 250000 pixels" in caught.value.details()


def test_a_small_file_that_decodes_huge_is_refused_before_decoding(limited) -> None:
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000), 255).save(bomb, format="PNG", optimize=True)  # 16 M pixels in a few KB
    assert len(bomb.getvalue()) < 64 * 1024
    with grpc.insecure_channel(limited.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            recognize(channel, [digits_pb2.Image(encoded=bomb.getvalue())])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "decompression-bomb guard" in caught.value.details()
        raw_at_limit = to_image(np.zeros((500, 500), dtype=np.uint8))
        assert len(recognize(channel, [raw_at_limit]).predictions) == 1


def test_huge_normalized_values_fail_only_their_own_request() -> None:
    """Finite but absurd values overflow inside the model: that request gets INVALID_ARGUMENT instead
    of NaN probabilities, and a request batched with it is answered normally."""
    from service.gen.inference import grpc_predict_v2_pb2 as pb
    from service.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    # A batch runs when two images are queued; the long delay only makes sure they wait for each other.
    with ServerThread(max_batch_size=2, max_batch_delay_ms=5000) as running, \
            grpc.insecure_channel(running.target) as channel:
        recognizer = running.server.recognizer
        assert recognizer is not None
        hostile = pb.ModelInferRequest(model_name=recognizer.model.name, inputs=[
            pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 1, 28, 28])])
        absurd = np.full((28, 28), -3e38, dtype="<f4")
        absurd[8:20, 12:16] = 3e38  # a stroke, so that the image has ink and reaches the model
        hostile.raw_input_contents.append(absurd.tobytes())
        bad = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(hostile, timeout=30)
        good = digits_pb2_grpc.DigitRecognizerStub(channel).Recognize.future(
            digits_pb2.RecognizeRequest(images=[GOOD]), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            bad.result()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or infinite" in caught.value.details()
        assert "normalized inputs should lie in" in caught.value.details()
        together = good.result().predictions[0]
        alone = recognize(channel, [GOOD, GOOD]).predictions[0]  # two images: a full batch, no waiting
        assert list(together.probabilities) == pytest.approx(list(alone.probabilities), abs=1e-5)
        # Both ran in one batch: the overflow stayed in its own row.
        registry = running.server.metrics.registry
        assert registry.get_sample_value("digits_batch_size_count") == 2
        assert registry.get_sample_value("digits_batch_size_sum") == 4


def test_every_limit_is_set_by_environment_through_the_cli(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "DIGITS_PORT": str(port), "DIGITS_METRICS_PORT": "0", "DIGITS_LOG_FORMAT": "json",
           "DIGITS_MAX_IMAGES_PER_REQUEST": "2", "DIGITS_MAX_IMAGE_PIXELS": "10000",
           "DIGITS_MAX_MESSAGE_BYTES": "100000", "DIGITS_MODEL": str(SHIPPED_MODEL)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stderr=subprocess.PIPE, text=True)
    marker = b"Zq9XkW3pLmQ7"
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target)
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 24)]) as channel:
            assert len(recognize(channel, [GOOD, GOOD]).predictions) == 2
            assert len(recognize(channel, [digits_pb2.Image(encoded=render(DIGITS[0], 80, (100, 100), (10, 10)))]
                                 ).predictions) == 1
            for images, code, message in [
                ([GOOD] * 3, grpc.StatusCode.INVALID_ARGUMENT, "limit is 2 per request"),
                ([digits_pb2.Image(encoded=render(DIGITS[0], 80, (101, 100), (10, 10)))],
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit of 10000 pixels"),
                ([digits_pb2.Image(encoded=b"\x89PNG" + marker * 9000)], grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "larger than max (1"),
                ([digits_pb2.Image(encoded=b"P5\n" + marker + b"\n")], grpc.StatusCode.INVALID_ARGUMENT,
                 "image 0: cannot decode"),
            ]:
                with pytest.raises(grpc.RpcError) as caught:
                    recognize(channel, images)
                assert caught.value.code() == code and message in caught.value.details()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["message"] == "request failed" and r.get("code") == "INVALID_ARGUMENT" for r in records)
    assert marker.decode() not in stderr  # logs never quote what the client sent
