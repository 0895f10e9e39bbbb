"""Property-based fuzzing of everything a client controls, against a real server and directly.

Arbitrary and mutated image files, raw pixels of any size, dtype and length, any number of images,
any Open Inference Protocol tensor: the answer is always a well-formed prediction per image or
INVALID_ARGUMENT / RESOURCE_EXHAUSTED (NOT_FOUND for an unknown v2 model) with a message; never
INTERNAL, UNKNOWN or a dead server, and no log line ever quotes the bytes a client sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition import preprocess
from service.recognition.decode import open_payload
from service.recognition.preprocess import ImageError, RawImage, to_pixels
from tests.fuzz.seeds import seed_images
from tests.harness import ServerThread, fixture_digits

MAX_IMAGES = 8
MAX_PIXELS = 500_000
MAX_MESSAGE = 1 << 20
# Planted in payloads: it must never come back in a log line (or an error message).
MARKER = b"Zq9XkW3pLmQ7"
SEEDS = list(seed_images().values())
GOOD = to_image(fixture_digits()[0][0])

FAILURES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Records(logging.Handler):
    """Every log line the server writes while the module runs, formatted as it would be printed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + " " + " ".join(f"{k}={v!r}" for k, v in vars(record).items()))


@pytest.fixture(scope="module")
def logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("service")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture(scope="module")
def server(logs: Records) -> Iterator[ServerThread]:
    with ServerThread(max_images_per_request=MAX_IMAGES, max_image_pixels=MAX_PIXELS, max_message_bytes=MAX_MESSAGE,
                      max_batch_delay_ms=0.5) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    # The client would refuse to send what the server must refuse to receive: lift its limits.
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                       ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        yield ch


# --- strategies -------------------------------------------------------------------------------------

@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image file of some format, then flipped, truncated, spliced or marked bytes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "mark")))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:  # overwrite header bytes with the marker: decoders that quote their input will show it
            data[at:at + len(MARKER)] = MARKER
    return bytes(data)


ENCODED = st.one_of(st.binary(max_size=1024), st.binary(max_size=64).map(lambda b: MARKER + b), mutated())

DIMENSION = st.one_of(st.integers(0, 48), st.sampled_from([28, 2**16, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
# proto3 enums are open: any int32 reaches the server as a dtype, not only the declared values.
DTYPE = st.one_of(st.sampled_from([digits_pb2.DTYPE_UNSPECIFIED, digits_pb2.DTYPE_UINT8, digits_pb2.DTYPE_FLOAT32]),
                  st.integers(-(2**31), 2**31 - 1))
FLOATS = st.one_of(st.floats(0, 1, width=32), st.floats(width=32))


@st.composite
def raw_pixels(draw: st.DrawFn) -> digits_pb2.RawPixels:
    """Any width/height/dtype; the data the right length (to reach the pixel checks) or not."""
    width, height, dtype = draw(DIMENSION), draw(DIMENSION), draw(DTYPE)
    itemsize = 4 if dtype == digits_pb2.DTYPE_FLOAT32 else 1
    if width * height <= 48 * 48 and draw(st.booleans()):
        if dtype == digits_pb2.DTYPE_FLOAT32:
            values = draw(arrays(np.float32, (height, width), elements=FLOATS))
            data = values.astype("<f4").tobytes()
        else:
            data = draw(st.binary(min_size=width * height * itemsize, max_size=width * height * itemsize))
    else:
        data = draw(st.binary(max_size=256))
    return digits_pb2.RawPixels(width=width, height=height, dtype=dtype, data=data)  # type: ignore[arg-type]


IMAGE = st.one_of(
    ENCODED.map(lambda data: digits_pb2.Image(encoded=data)),
    raw_pixels().map(lambda raw: digits_pb2.Image(raw=raw)),
    st.just(GOOD),
    st.just(digits_pb2.Image()),  # neither encoded nor raw
)
# Rarely, one image straddling the message limit.
NEAR_LIMIT = st.integers(MAX_MESSAGE - 64, MAX_MESSAGE + 64).map(lambda n: digits_pb2.Image(encoded=bytes(n)))
REQUEST_IMAGES = st.one_of(st.lists(IMAGE, max_size=MAX_IMAGES + 3), st.lists(NEAR_LIMIT, min_size=1, max_size=1))


# --- checks -----------------------------------------------------------------------------------------

def check_prediction(prediction: digits_pb2.Prediction) -> None:
    probabilities = np.array(prediction.probabilities)
    assert 0 <= prediction.digit <= 9
    assert probabilities.shape == (10,) and np.isfinite(probabilities).all()
    assert abs(probabilities.sum() - 1.0) < 1e-3
    assert prediction.confidence == pytest.approx(probabilities.max()) == probabilities[prediction.digit]


def check_good_request(channel: grpc.Channel) -> None:
    """The server still answers after everything it was sent."""
    reply = digits_pb2_grpc.DigitRecognizerStub(channel).Recognize(
        digits_pb2.RecognizeRequest(images=[GOOD]), timeout=10)
    assert len(reply.predictions) == 1


def check_logs(logs: Records) -> None:
    assert logs.lines, "the server logged nothing: the log check would prove nothing"
    leaked = [line for line in logs.lines if MARKER.decode() in line or MARKER[:6].decode() in line]
    assert leaked == []


# --- against the real server ------------------------------------------------------------------------

def test_recognize_never_fails_internally(channel, logs) -> None:
    stub = digits_pb2_grpc.DigitRecognizerStub(channel)
    seen: set[str] = set()

    # Each outcome is reached by an explicit example whatever the random draws do; hypothesis adds 250 more.
    @fuzz_settings(250)
    @given(REQUEST_IMAGES)
    @example([GOOD])
    @example([GOOD, digits_pb2.Image(encoded=b"not an image at all")])
    @example([digits_pb2.Image(raw=digits_pb2.RawPixels(width=MAX_PIXELS, height=2, dtype=digits_pb2.DTYPE_UINT8))])
    def recognize(images: list[digits_pb2.Image]) -> None:
        try:
            reply = stub.Recognize(digits_pb2.RecognizeRequest(images=images), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in FAILURES, f"{exc.code()}: {exc.details()}"
            assert exc.details()
            assert MARKER.decode() not in exc.details()
            seen.add(exc.code().name)
            return
        seen.add("OK")
        assert len(reply.predictions) == len(images)
        for prediction in reply.predictions:
            check_prediction(prediction)

    recognize()
    assert seen == {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    check_good_request(channel)
    check_logs(logs)


def test_recognize_stream_answers_every_message_exactly_once(channel, logs) -> None:
    stub = digits_pb2_grpc.DigitRecognizerStub(channel)

    @fuzz_settings(80)
    @given(st.lists(st.one_of(IMAGE, st.none()), min_size=1, max_size=12))
    def stream(images: list[digits_pb2.Image | None]) -> None:
        messages = [digits_pb2.StreamRequest(id=str(i), image=image) if image is not None
                    else digits_pb2.StreamRequest(id=str(i)) for i, image in enumerate(images)]
        replies = list(stub.RecognizeStream(iter(messages), timeout=30))
        assert sorted(int(r.id) for r in replies) == list(range(len(messages)))
        for reply in replies:
            if reply.HasField("error"):
                assert reply.error.code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), reply.error
                assert reply.error.message and MARKER.decode() not in reply.error.message
            else:
                check_prediction(reply.prediction)
            assert reply.model.name and reply.model.version

    stream()
    check_good_request(channel)
    check_logs(logs)


def _v2() -> Any:
    from service.gen.inference import grpc_predict_v2_pb2

    return grpc_predict_v2_pb2


@st.composite
def v2_request(draw: st.DrawFn, model_name: str) -> Any:
    """A ModelInferRequest. A third are anything at all; the rest are well-formed but for at most one
    field, so that the fuzzer also gets past each check in turn and reaches inference."""
    pb = _v2()
    chaos = draw(st.integers(0, 2)) == 0
    broken = None if chaos else draw(st.sampled_from(
        [None, None, None, "model", "version", "name", "datatype", "shape", "length", "inputs", "outputs", "both"]))

    def pick(part: str, good: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
        return draw(bad if chaos or broken == part else good)

    count = draw(st.integers(1, MAX_IMAGES))
    shape = pick("shape", st.just([count, 1, 28, 28]), st.one_of(
        st.integers(0, MAX_IMAGES + 2).map(lambda n: [n, 1, 28, 28]),
        st.lists(st.one_of(st.integers(-2, 30), st.integers(-(2**63), 2**63 - 1)), max_size=5)))
    datatype = pick("datatype", st.sampled_from(["FP32", "UINT8"]), st.one_of(
        st.sampled_from(["FP32", "UINT8", "INT64", "BYTES", "fp32", ""]), st.text(max_size=8)))
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=pick("name", st.just("image"), st.sampled_from(["image", "input", ""])), datatype=datatype, shape=shape)
    request = pb.ModelInferRequest(
        model_name=pick("model", st.just(model_name), st.sampled_from([model_name, "other", ""])),
        model_version=pick("version", st.just(""), st.sampled_from(["", "0", "no-such-version"])))
    elements = max(0, min(math.prod(shape) if shape else 0, MAX_IMAGES * 784))
    right_length = not (chaos or broken == "length") or draw(st.booleans())
    typed = draw(st.booleans())
    if not typed or broken == "both":
        if right_length and datatype == "FP32":
            # Mixed values, or one value everywhere: a whole image of huge (finite) values is what
            # overflows inside the model.
            data = draw(st.one_of(
                arrays(np.float32, elements, elements=st.floats(-1e6, 1e6, width=32) | FLOATS),
                arrays(np.float32, elements, elements=st.sampled_from([3e38, -3e38, 1e20, -1e20]) | FLOATS,
                       fill=st.nothing()).map(lambda a: np.full_like(a, a.flat[0]) if a.size else a))).tobytes()
        elif right_length:
            data = draw(st.binary(min_size=elements, max_size=elements))
        else:
            data = draw(st.binary(max_size=128))
        request.raw_input_contents.append(data)
    if typed or broken == "both":
        size = elements if right_length else draw(st.sampled_from([elements + 1, max(0, elements - 1), 3]))
        kind = draw(st.sampled_from(["fp32", "uint", "int64"])) if chaos or broken == "datatype" else \
            ("fp32" if datatype == "FP32" else "uint")
        if kind == "fp32":
            tensor.contents.fp32_contents.extend(draw(st.lists(
                st.floats(-1e6, 1e6, width=32) | FLOATS, min_size=size, max_size=size)))
        elif kind == "uint":
            values = st.integers(0, 255) if right_length else st.integers(0, 2**32 - 1)
            tensor.contents.uint_contents.extend(draw(st.lists(values, min_size=size, max_size=size)))
        else:
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8)))
    request.inputs.append(tensor)
    if chaos or broken == "inputs":
        for _ in range(draw(st.integers(0, 1))):
            request.inputs.append(pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1]))
    outputs = pick("outputs", st.lists(st.sampled_from(["probabilities", "logits"]), max_size=2, unique=True),
                   st.lists(st.sampled_from(["probabilities", "logits", "nope"]), max_size=3))
    for name in outputs:
        request.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name=name))
    return request


def test_open_inference_protocol_never_fails_internally(server, channel, logs) -> None:
    pb = _v2()
    from service.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    recognizer = server.server.recognizer
    assert recognizer is not None
    model_name = recognizer.model.name
    seen: set[str] = set()

    @fuzz_settings(250)
    @given(v2_request(model_name))
    def infer(request: pb.ModelInferRequest) -> None:  # type: ignore[name-defined]
        try:
            reply = stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in (*FAILURES, grpc.StatusCode.NOT_FOUND), f"{exc.code()}: {exc.details()}"
            assert exc.details()
            seen.add(exc.code().name)
            return
        seen.add("OK")
        count = request.inputs[0].shape[0]
        assert reply.model_name == model_name and reply.model_version == recognizer.model.version
        assert len(reply.outputs) >= 1
        for index, output in enumerate(reply.outputs):
            assert list(output.shape) == [count, 10] and output.datatype == "FP32"
            if reply.raw_output_contents:
                values = np.frombuffer(reply.raw_output_contents[index], dtype="<f4")
            else:
                values = np.array(output.contents.fp32_contents, dtype=np.float32)
            assert values.size == count * 10
            assert np.isfinite(values).all(), f"{output.name} is not finite"
            if output.name == "probabilities":
                np.testing.assert_allclose(values.reshape(count, 10).sum(axis=1), 1.0, atol=1e-3)

    infer()
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= seen
    check_good_request(channel)
    check_logs(logs)


# --- the preprocessing functions directly -----------------------------------------------------------

def check_pixels(pixels: np.ndarray) -> None:
    assert pixels.shape == (28, 28)
    if pixels.dtype == np.uint8:
        return
    assert pixels.dtype == np.float32 and np.isfinite(pixels).all()
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


@fuzz_settings(1500)
@given(ENCODED, st.sampled_from(["light_on_dark", "dark_on_light"]))
def test_decoding_any_bytes_gives_28x28_pixels_or_an_image_error(data: bytes, polarity: str) -> None:
    try:
        pixels = to_pixels(data, max_pixels=MAX_PIXELS, ink_polarity=polarity)
    except ImageError as exc:  # ImageTooLarge is one
        assert str(exc) and MARKER.decode() not in str(exc)
        return
    check_pixels(pixels)


@fuzz_settings(800)
@given(st.integers(0, 64) | st.integers(0, 2**40), st.integers(0, 64) | st.integers(0, 2**40),
       st.sampled_from(["uint8", "float32", "float64", "int8", "UINT8", ""]), st.data())
def test_raw_pixels_of_any_shape_give_28x28_pixels_or_an_image_error(width: int, height: int, dtype: str,
                                                                      data: st.DataObject) -> None:
    itemsize = 4 if dtype == "float32" else 1
    if width * height <= 64 * 64 and data.draw(st.booleans()):
        if dtype == "float32":
            payload = data.draw(arrays(np.float32, (height, width), elements=FLOATS)).astype("<f4").tobytes()
        else:
            payload = data.draw(st.binary(min_size=width * height * itemsize, max_size=width * height * itemsize))
    else:
        payload = data.draw(st.binary(max_size=64))
    try:
        pixels = to_pixels(RawImage(width, height, dtype, payload), max_pixels=MAX_PIXELS)
    except ImageError as exc:
        assert str(exc)
        return
    check_pixels(pixels)


PAYLOAD = st.one_of(
    ENCODED,
    st.sampled_from(SEEDS),
    st.builds(lambda a: RawImage(a.shape[1], a.shape[0], "uint8", a.tobytes()),
              arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)))),
    st.builds(lambda a: RawImage(28, 28, "float32", a.astype("<f4").tobytes()),
              arrays(np.float32, (28, 28), elements=st.floats(0, 1, width=32))),
)


@fuzz_settings(400)
@given(st.lists(PAYLOAD, min_size=1, max_size=6), st.sampled_from(["light_on_dark", "dark_on_light"]))
def test_batched_preprocessing_equals_image_by_image(payloads: list[bytes | RawImage], polarity: str) -> None:
    """The request path's batched preprocessing gives exactly what one-by-one would, errors included.
    Headers are checked for every image before any is decoded, so a bad header anywhere is reported
    before a file that opens but fails to decode."""
    singles: list[np.ndarray] = []
    first_error: int | None = None
    for index, payload in enumerate(payloads):
        try:
            singles.append(to_pixels(payload, max_pixels=MAX_PIXELS, ink_polarity=polarity))
        except ImageError:
            first_error = index
            break
    bad_header = None
    for index, payload in enumerate(payloads):
        try:
            open_payload(payload, MAX_PIXELS)
        except ImageError:
            bad_header = index
            break
    try:
        batch = preprocess.to_pixel_batch(payloads, max_pixels=MAX_PIXELS, ink_polarity=polarity)
    except ImageError as exc:
        assert exc.index == (bad_header if bad_header is not None else first_error)
        return
    assert first_error is None
    expected = np.stack(singles)
    if len({s.dtype for s in singles}) > 1:
        expected = np.stack([s.astype(np.float32) / 255.0 if s.dtype == np.uint8 else s for s in singles])
    np.testing.assert_array_equal(batch, expected)


# --- the libFuzzer harness (tests/fuzz/fuzz_decode.py) stays runnable ---------------------------------

def test_libfuzzer_harness_accepts_its_seed_corpus(tmp_path) -> None:
    import struct
    import subprocess
    import sys

    from tests.fuzz import fuzz_decode

    raw = fuzz_decode.RAW_PREFIX + struct.pack("<HHB", 28, 28, 0) + bytes(784)
    for data in [*SEEDS, raw, fuzz_decode.RAW_PREFIX + b"\xff" * 9, b"", MARKER * 3]:
        fuzz_decode.check(data)  # raises on anything but a good array or a clean ImageError
    assert isinstance(fuzz_decode.payload_of(raw), RawImage)
    try:
        import atheris  # noqa: F401
    except ImportError:  # no wheel for this platform (the dev extra installs it on x86_64 Linux)
        pytest.skip("atheris is not installed (pip install '.[fuzz]'); `make fuzz` runs the harness")
    from tests.fuzz.seeds import main as write_seeds

    write_seeds(["seeds", str(tmp_path / "corpus")])
    run = subprocess.run([sys.executable, "tests/fuzz/fuzz_decode.py", "-runs=300", f"-artifact_prefix={tmp_path}/",
                          str(tmp_path / "corpus")], capture_output=True, text=True, timeout=120,
                         cwd=Path(fuzz_decode.__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Done 300 runs" in run.stderr
