"""KServe's model layout and names: `--model` may name a directory holding exactly one `.onnx` file (KServe
mounts a model's storage at /mnt/models, e.g. /mnt/models/lenet5.onnx, with no model-settings file), and
`--model-name` sets the name the model is served as, because KServe routes by the InferenceService's name.

A directory with no `.onnx` file, or several, stops the start-up with a message naming what it holds; a
directory watched with --watch follows the file in it; the name survives reloads and reaches every protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service.client import DigitsClient
from service.server.app import StartupError
from service.server.config import ServerConfig
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port, scrape, wait_until
from tests.server.test_reload import make_version

IMAGES, LABELS = fixture_digits()


def kserve_dir(root: Path, *names: str) -> Path:
    """A /mnt/models-like directory: the shipped model under each of `names`, next to what a storage
    initializer or the training Job leaves there (a model card, a run folder, a hidden temp file)."""
    root.mkdir()
    for name in names:
        shutil.copy(SHIPPED_MODEL, root / name)
    (root / "lenet5.json").write_text("{}")
    (root / "runs" / "20260101T000000Z").mkdir(parents=True)
    shutil.copy(SHIPPED_MODEL, root / "runs" / "20260101T000000Z" / "lenet5.onnx")  # not directly inside
    (root / ".lenet5.onnx.tmp.onnx").write_bytes(b"half-written")  # hidden: being renamed into place
    return root


def test_a_directory_with_one_model_is_served(tmp_path: Path) -> None:
    models = kserve_dir(tmp_path / "models", "lenet5.onnx")
    with ServerThread(model=models) as running, DigitsClient(running.target) as client:
        assert running.server.recognizer is not None
        assert running.server.recognizer.model.path == models / "lenet5.onnx"
        reply = client.recognize(list(IMAGES[:20]))
        assert np.mean([p.digit for p in reply.predictions] == LABELS[:20]) >= 0.9


@pytest.mark.parametrize(("names", "held"), [
    ((), "it holds none"),
    (("lenet5.onnx", "lenet5-int8.onnx"), "it holds 2: lenet5-int8.onnx, lenet5.onnx"),
], ids=["none", "two"])
def test_a_directory_without_exactly_one_model_stops_the_start_up(tmp_path: Path, names, held) -> None:
    models = kserve_dir(tmp_path / "models", *names)
    with pytest.raises(StartupError, match=f"--model {models} is a directory, which must hold exactly one "
                                           f".onnx file; {held}"):
        ServerThread(model=models).start()
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model", str(models), "--port", "0",
                             "--metrics-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and held in result.stderr and "Traceback" not in result.stderr


def test_model_name_is_served_on_every_protocol_and_survives_a_reload(tmp_path: Path) -> None:
    models = kserve_dir(tmp_path / "models", "lenet5.onnx")
    with ServerThread(model=models, model_name="digits", http_port=free_port(), metrics_port=free_port(),
                      watch=True, watch_interval_s=0.05) as running:
        server = running.server
        base = f"http://127.0.0.1:{server.http_port}"
        with urllib.request.urlopen(f"{base}/v2/models/digits", timeout=10) as page:
            assert json.loads(page.read())["name"] == "digits"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/v2/models/lenet5", timeout=10)
        assert missing.value.code == 404
        v2 = triton.InferenceServerClient(running.target)
        pixels = IMAGES[:4].reshape(4, 1, 28, 28)
        tensor = triton.InferInput("image", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        result = v2.infer("digits", [tensor])
        assert result.get_response().model_name == "digits"
        with DigitsClient(running.target) as client:
            assert client.recognize([IMAGES[0]]).model_name == "digits"
        # The model file in the directory replaced (a new version), picked up by --watch: same name.
        os.replace(make_version(SHIPPED_MODEL, tmp_path / "v2.onnx", "2-dir-test"), models / "lenet5.onnx")
        assert server.recognizer is not None
        recognizer = server.recognizer
        wait_until(lambda: recognizer.model.version == "2-dir-test", timeout=30, what="--watch to load v2")
        assert recognizer.model.name == "digits"
        assert scrape(server.metrics_port).by("digits_model_info", "name") == {"digits": 1.0}


def test_watch_follows_the_directory_to_a_new_file_name(tmp_path: Path) -> None:
    models = kserve_dir(tmp_path / "models", "lenet5.onnx")
    with ServerThread(model=models, watch=True, watch_interval_s=0.05) as running:
        assert running.server.recognizer is not None
        recognizer = running.server.recognizer
        # A new file next to the old: two files, which the watcher waits out; then the old one goes.
        make_version(SHIPPED_MODEL, models / "lenet5-v2.onnx", "2-renamed")
        (models / "lenet5.onnx").unlink()
        wait_until(lambda: recognizer.model.version == "2-renamed", timeout=30, what="the new file to be served")
        assert recognizer.model.path == models / "lenet5-v2.onnx"
        with DigitsClient(running.target) as client:
            assert client.recognize([IMAGES[0]]).model_version == "2-renamed"


def test_a_reload_into_an_ambiguous_directory_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = kserve_dir(tmp_path / "models", "lenet5.onnx")
    with ServerThread(model=models) as running:
        shutil.copy(SHIPPED_MODEL, models / "other.onnx")
        running.call(running.server._reload())
        assert running.server.recognizer is not None
        assert running.server.recognizer.model.path == models / "lenet5.onnx"
        assert running.server.metrics.model_reloads.labels(result="failed")._value.get() == 1
        with DigitsClient(running.target) as client:
            assert client.health() == "SERVING"
    assert any("model reload refused" in r.getMessage() and "it holds 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["", "has space", "a/b", "-leading", "x" * 254])
def test_model_names_that_cannot_be_a_route_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="model-name"):
        ServerConfig(model_name=name)


def test_kserve_names_are_accepted() -> None:
    assert ServerConfig(model_name="digits-predictor.v1_2").model_name == "digits-predictor.v1_2"


def test_grpc_v2_metadata_names_the_served_name() -> None:
    with ServerThread(model_name="mnist") as running:
        v2 = triton.InferenceServerClient(running.target)
        assert v2.get_model_metadata("mnist").name == "mnist"
        with pytest.raises(InferenceServerException) as caught:
            v2.get_model_metadata("lenet5")
        assert caught.value.status() == str(grpc.StatusCode.NOT_FOUND) and "serves 'mnist'" in str(caught.value)
