"""Bad input gets the right status and a message naming the image and the problem; the server keeps
serving and later requests are unaffected."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import ServerThread, fixture_digits

MAX_IMAGES = 8
MAX_PIXELS = 1_000_000
MAX_MESSAGE = 256 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(max_images_per_request=MAX_IMAGES, max_image_pixels=MAX_PIXELS,
                      max_message_bytes=MAX_MESSAGE) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[digits_pb2_grpc.DigitRecognizerStub]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield digits_pb2_grpc.DigitRecognizerStub(channel)


GOOD = to_image(fixture_digits()[0][0])


def raw(width: int, height: int, dtype: digits_pb2.DType | int, data: bytes) -> digits_pb2.Image:
    return digits_pb2.Image(raw=digits_pb2.RawPixels(width=width, height=height, dtype=dtype,  # type: ignore[arg-type]
                                                     data=data))


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's calling card)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # keep the chunk's CRC valid
    return bytes(data)


NAN = np.full((28, 28), np.nan, dtype="<f4").tobytes()
INF = np.full((28, 28), np.inf, dtype="<f4").tobytes()

CASES = [
    ("empty request", [], grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ("too many images", [GOOD] * (MAX_IMAGES + 1), grpc.StatusCode.INVALID_ARGUMENT, "limit is 8"),
    ("undecodable bytes", [GOOD, digits_pb2.Image(encoded=b"\x89PNG garbage")],
     grpc.StatusCode.INVALID_ARGUMENT, "image 1: cannot decode"),
    ("empty encoded", [digits_pb2.Image(encoded=b"")], grpc.StatusCode.INVALID_ARGUMENT,
     "image 0: encoded image is empty"),
    ("image without payload", [GOOD, GOOD, digits_pb2.Image()], grpc.StatusCode.INVALID_ARGUMENT,
     "image 2: has neither"),
    ("raw length mismatch", [raw(28, 28, digits_pb2.DTYPE_UINT8, b"\x00" * 783)],
     grpc.StatusCode.INVALID_ARGUMENT, "image 0: raw pixels data is 783 bytes"),
    ("raw float length mismatch", [raw(28, 28, digits_pb2.DTYPE_FLOAT32, b"\x00" * 784)],
     grpc.StatusCode.INVALID_ARGUMENT, "needs 3136"),
    ("zero width", [raw(0, 28, digits_pb2.DTYPE_UINT8, b"")], grpc.StatusCode.INVALID_ARGUMENT, "width and height"),
    ("unspecified dtype", [raw(28, 28, digits_pb2.DTYPE_UNSPECIFIED, b"\x00" * 784)],
     grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("huge raw dimensions", [raw(100_000, 100_000, digits_pb2.DTYPE_UINT8, b"")],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "image 0: raw image of 100000x100000"),
    ("decompression bomb", [digits_pb2.Image(encoded=png_header_claiming(50_000, 50_000))],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "decompression-bomb"),
    ("NaN floats", [GOOD, raw(28, 28, digits_pb2.DTYPE_FLOAT32, NAN)], grpc.StatusCode.INVALID_ARGUMENT,
     "image 1: raw float32 pixels contain NaN"),
    ("infinite floats", [raw(28, 28, digits_pb2.DTYPE_FLOAT32, INF)], grpc.StatusCode.INVALID_ARGUMENT,
     "NaN or infinity"),
    ("floats out of range", [raw(28, 28, digits_pb2.DTYPE_FLOAT32, np.full((28, 28), 3.0, "<f4").tobytes())],
     grpc.StatusCode.INVALID_ARGUMENT, "[0, 1]"),
    ("oversized message", [digits_pb2.Image(encoded=b"\x00" * (MAX_MESSAGE + 1))],
     grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize(("images", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_clear_status_and_server_keeps_serving(stub, images, code, message) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recognize(digits_pb2.RecognizeRequest(images=images), timeout=10)
    assert caught.value.code() == code
    assert message in caught.value.details()
    # The next request is unaffected.
    reply = stub.Recognize(digits_pb2.RecognizeRequest(images=[GOOD]), timeout=10)
    assert len(reply.predictions) == 1


def test_failures_are_counted_by_status(server, stub) -> None:
    registry = server.server.metrics.registry
    labels = {"rpc": "Recognize", "code": "INVALID_ARGUMENT"}
    before = registry.get_sample_value("digits_requests_total", labels) or 0.0
    ok_before = registry.get_sample_value("digits_requests_total", {"rpc": "Recognize", "code": "OK"}) or 0.0
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Recognize(digits_pb2.RecognizeRequest(images=[]), timeout=10)
    assert registry.get_sample_value("digits_requests_total", labels) == before + 3
    assert registry.get_sample_value("digits_requests_total", {"rpc": "Recognize", "code": "OK"}) == ok_before
