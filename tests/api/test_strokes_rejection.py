"""The strokes test through a real server: pictures that the model alone reads as confident digits (a
filled blob read as a 0, a grey shape with a dark outline read as a 1) are not strokes, and come back
`not_a_digit` through every protocol (and the grey one through the reader); the flags switch the test
off, and a model whose rule predates it serves them as the model reads them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image, ImageDraw

from service.client import DigitsClient
from service.recognition.preprocess import to_pixels
from tests.harness import SHIPPED_MODEL, ServerThread, free_port, request


def pictures() -> list[bytes]:
    """A filled ellipse (the model alone: a 0 at 0.85) and a grey tall shape outlined in black (a 1 at
    0.77), dark on white PNGs as a photo of a thing would be."""
    blob = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(blob).ellipse((20, 20, 100, 140), fill=0)
    grey = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(grey).polygon([(50, 5), (70, 5), (80, 155), (40, 155)], fill=190, outline=0, width=3)
    files = []
    for page in (blob, grey):
        out = io.BytesIO()
        page.save(out, format="PNG")
        files.append(out.getvalue())
    return files


def model_without_strokes(path: Path) -> Path:
    """The shipped model with the strokes thresholds taken out of its rule, as models before 2.2.0 are."""
    model = onnx.load(str(SHIPPED_MODEL))
    for prop in model.metadata_props:
        if prop.key == "rejection":
            rule = json.loads(prop.value)
            assert rule.pop("strokes"), "the shipped model's rule has the strokes test"
            prop.value = json.dumps(rule)
    onnx.save(model, str(path))
    return path


def test_pictures_that_are_not_strokes_are_not_a_digit_through_every_protocol() -> None:
    files = pictures()
    with ServerThread(http_port=free_port(), max_batch_delay_ms=1.0) as server, \
            DigitsClient(server.target) as client:
        registry = server.server.metrics.registry
        before = registry.get_sample_value("digits_rejected_predictions_total", {"reason": "not_a_digit"}) or 0.0
        assert [p.rejection for p in client.recognize(files).predictions] == ["not_a_digit"] * 2
        after = registry.get_sample_value("digits_rejected_predictions_total", {"reason": "not_a_digit"})
        assert after is not None and after - before == 2
        # The reader's ink map evens out the paper locally, which hollows a filled shape into its outline:
        # there only the grey picture is caught (docs/training.md, "The strokes test").
        [reading] = client.read(files[1:]).readings
        assert (reading.accepted, reading.rejection, [d.prediction.rejection for d in reading.digits]) == \
            (False, "not_a_digit", ["not_a_digit"])
        url = f"127.0.0.1:{server.server.http_port}"
        for data in files:
            status, _, reply = request(url, "POST", "/v1/recognize", data, {"Content-Type": "image/png"})
            assert status == 200 and json.loads(reply)["rejection"] == "not_a_digit", reply
        # The Open Inference Protocol: the same pictures as the recipe's pixels, one tensor, in one batch.
        batch = np.stack([to_pixels(data) for data in files])[:, None]
        v2 = triton_grpc.InferenceServerClient(server.target)
        try:
            tensor = triton_grpc.InferInput("image", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            result = v2.infer("lenet5", [tensor], outputs=[triton_grpc.InferRequestedOutput("accepted")])
            assert result.as_numpy("accepted").tolist() == [False, False]
        finally:
            v2.close()


@pytest.mark.parametrize("how", ["flags", "older model"])
def test_without_the_strokes_test_the_model_reads_them_as_digits(how: str, tmp_path: Path) -> None:
    settings: dict[str, Any] = ({"reject_filled_above": 1.0, "reject_grey_inside_above": 1.0} if how == "flags"
                                else {"model": model_without_strokes(tmp_path / "older.onnx")})
    with ServerThread(**settings) as server, DigitsClient(server.target) as client:
        predictions = client.recognize(pictures()).predictions
    assert [(p.digit, p.accepted) for p in predictions] == [(0, True), (1, True)]
