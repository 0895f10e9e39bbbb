"""Reading whole numbers through every way in: gRPC `Read`, REST `POST /v1/read`, `digits read` on many files,
and the Python client, against a real server; numbers composed from real fixture digits of every kind.
(The reader itself is tested in tests/recognition/test_reader.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.client import DigitsClient, Failure
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.perf.reading.numbers import KINDS, Number, compose
from tests.harness import ServerThread, fixture_digits, free_port, multipart, request, scrape

IMAGES, LABELS = fixture_digits()
BLANK = digits_pb2.Image(raw=digits_pb2.RawPixels(width=300, height=60, dtype=digits_pb2.DTYPE_UINT8,
                                                  data=bytes([255]) * 18000))


@pytest.fixture(scope="module")
def numbers() -> dict[str, list[Number]]:
    rng = np.random.default_rng(20261201)
    return {kind: [compose(IMAGES, LABELS, kind, rng, lengths=(2, 5)) for _ in range(12)] for kind in KINDS}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(http_port=free_port(), metrics_port=free_port(), max_images_per_request=64) as running:
        yield running


def test_grpc_read_returns_text_boxes_and_a_prediction_per_digit(server, numbers) -> None:
    spaced = numbers["spaced"]
    with grpc.insecure_channel(server.target) as channel:
        reply = digits_pb2_grpc.DigitRecognizerStub(channel).Read(
            digits_pb2.ReadRequest(images=[digits_pb2.Image(encoded=n.png) for n in spaced] + [BLANK]), timeout=60)
    assert len(reply.readings) == len(spaced) + 1 and reply.model.name == "lenet5"
    right = 0
    for number, reading in zip(spaced, reply.readings, strict=False):
        assert len(reading.digits) == len(reading.text)
        assert reading.text == "".join(str(d.prediction.digit) for d in reading.digits)
        assert reading.confidence == pytest.approx(np.prod([d.prediction.confidence for d in reading.digits]),
                                                   rel=1e-4)
        for digit in reading.digits:
            assert len(digit.prediction.probabilities) == 10 and digit.box.width > 0 and digit.box.height > 0
        assert reading.accepted == all(d.prediction.accepted for d in reading.digits)
        right += reading.text == number.text
    assert right >= len(spaced) - 2, f"{right}/{len(spaced)} spaced numbers read exactly"
    blank = reply.readings[-1]
    assert (blank.text, blank.accepted, blank.rejection, len(blank.digits)) == (
        "", False, digits_pb2.REJECTION_NO_INK, 0)


def test_rest_read_raw_body_and_multipart(server, numbers) -> None:
    url = f"127.0.0.1:{server.server.http_port}"
    tight = numbers["tight"][:6]
    right = 0
    for index, number in enumerate(tight):
        body, kind = multipart("image", "n.png", number.png) if index % 2 else (number.png, "image/png")
        status, _, reply = request(url, "POST", "/v1/read", body, {"Content-Type": kind})
        assert status == 200, reply
        answer = json.loads(reply)
        assert set(answer) == {"text", "confidence", "accepted", "rejection", "digits", "model"}
        assert [set(d) for d in answer["digits"]] == [{"digit", "confidence", "accepted", "rejection", "box"}] * \
            len(answer["text"])
        assert all(len(d["box"]) == 4 for d in answer["digits"])
        right += answer["text"] == number.text
    assert right >= len(tight) - 2
    status, _, reply = request(url, "POST", "/v1/read", b"not an image", {"Content-Type": "image/png"})
    assert status == 400 and "cannot decode" in json.loads(reply)["error"]


def test_every_kind_is_read_and_each_box_covers_its_digit(server, numbers) -> None:
    with DigitsClient(server.target) as client:
        for kind in KINDS:
            readings = client.read([n.png for n in numbers[kind]]).readings
            exact = [(n, r) for n, r in zip(numbers[kind], readings, strict=True) if r.text == n.text]
            need = {"spaced": 10, "tight": 9, "touching": 5}[kind]
            assert len(exact) >= need, f"{kind}: {len(exact)}/{len(readings)} read exactly"
            for number, reading in exact:
                for (x, y, w, h), digit in zip(number.boxes, reading.digits, strict=True):
                    bx, by, bw, bh = digit.box
                    # Where strokes overlap, boxes share pixels; most of the true digit lies in its box.
                    ox = max(0, min(x + w, bx + bw) - max(x, bx))
                    oy = max(0, min(y + h, by + bh) - max(y, by))
                    assert ox * oy >= 0.7 * w * h, (kind, number.text, (x, y, w, h), digit.box)


def test_digits_read_on_many_files_keeps_their_order(server, numbers, tmp_path: Path) -> None:
    files = []
    for i in range(40):
        number = numbers[KINDS[i % 3]][i % 12]
        path = tmp_path / f"n{i:02d}.png"
        path.write_bytes(number.png)
        files.append(path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    files.insert(7, tmp_path / "broken.png")
    cli = [sys.executable, "-m", "service.cli", "read", "--server", server.target, "--batch", "8"]
    done = subprocess.run([*cli, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(f) for f in files if f.name != "broken.png"]
    assert all(len(line.split("\t")) == 3 for line in lines)
    assert "broken.png: INVALID_ARGUMENT" in done.stderr
    rows = json.loads(subprocess.run([*cli, "--json", *map(str, files)], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    good = [r for r in rows if "text" in r]
    assert len(good) == 40 and all({"file", "text", "confidence", "accepted", "digits"} <= set(r) for r in good)


def test_read_stream_answers_every_image_by_id_as_read_would(server, numbers) -> None:
    every = [n for kind in KINDS for n in numbers[kind]]
    images = [digits_pb2.Image(encoded=n.png) for n in every] + [BLANK]
    metrics = scrape(server.server.metrics_port)
    streamed_before = metrics.value("digits_images_received_total", rpc="ReadStream")
    ok_before = metrics.value("digits_requests_total", rpc="ReadStream", code="OK")

    def messages() -> Iterator[digits_pb2.StreamRequest]:
        for i, image in enumerate(images):
            yield digits_pb2.StreamRequest(id=f"n-{i}", image=image)
        yield digits_pb2.StreamRequest(id="broken", image=digits_pb2.Image(encoded=b"not an image"))
        yield digits_pb2.StreamRequest(id="empty")
        yield digits_pb2.StreamRequest(id="after", image=images[0])

    with grpc.insecure_channel(server.target) as channel:
        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        unary = stub.Read(digits_pb2.ReadRequest(images=images), timeout=60).readings
        replies = {r.id: r for r in stub.ReadStream(messages(), timeout=60)}
    assert len(replies) == len(images) + 3
    for i, reading in enumerate(unary):  # the same readings, digit for digit and box for box
        assert replies[f"n-{i}"].reading == reading, f"number {i}"
    assert replies["n-0"].model.name == "lenet5" and replies["n-0"].model.version
    assert replies[f"n-{len(images) - 1}"].reading.rejection == digits_pb2.REJECTION_NO_INK
    broken, empty = replies["broken"], replies["empty"]
    assert (broken.WhichOneof("result"), broken.error.code) == ("error", "INVALID_ARGUMENT")
    assert "cannot decode" in broken.error.message
    assert (empty.error.code, "has no image" in empty.error.message) == ("INVALID_ARGUMENT", True)
    assert replies["after"].reading == unary[0]
    metrics = scrape(server.server.metrics_port)
    assert metrics.value("digits_images_received_total", rpc="ReadStream") - streamed_before == len(images) + 3
    assert metrics.value("digits_requests_total", rpc="ReadStream", code="OK") - ok_before == len(images) + 1


def test_python_client_read_stream(server, numbers) -> None:
    spaced = numbers["spaced"]
    with DigitsClient(server.target, timeout=60) as client:
        unary = client.read([n.png for n in spaced]).readings
        streamed = dict(client.read_stream([*(n.png for n in spaced), b"not an image"]))
    assert sorted(streamed) == list(range(len(spaced) + 1))
    assert [streamed[i] for i in range(len(spaced))] == unary
    failure = streamed[len(spaced)]
    assert isinstance(failure, Failure) and failure.code == "INVALID_ARGUMENT"


def test_reading_metrics(server) -> None:
    metrics = scrape(server.server.metrics_port)
    outcomes = metrics.by("digits_readings_total", "outcome")
    assert outcomes.get("no_ink", 0) >= 1 and sum(outcomes.values()) >= 12
    assert metrics.value("digits_reading_digits_count") == sum(outcomes.values())
    assert metrics.value("digits_segmentation_duration_seconds_count") >= 3
    assert metrics.value("digits_requests_total", rpc="Read", code="OK") >= 1
