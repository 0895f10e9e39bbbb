"""Start-up faults through the real CLI: each gives one clear line naming the problem and a non-zero
exit, never a traceback. (Missing, corrupt and metadata-less models and a busy gRPC port are covered in
test_server_lifecycle.py.)

The models here are small ONNX graphs built with onnx.helper that carry valid metadata but break the
serving contract one way at a time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import SHIPPED_MODEL, build_model, free_port, shipped_metadata


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    environ = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", *args], capture_output=True, text=True,
                          timeout=60, env=environ)


MODEL_FAULTS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("rgb-32x32-input", lambda p: build_model(p, input_shape=("N", 3, 32, 32)),
     "input 'image' must be float32 [N, 1, 28, 28], is tensor(float) ['N', 3, 32, 32]"),
    ("input-named-differently", lambda p: build_model(p, input_name="pixels"),
     "must have exactly one input named 'image', has ['pixels']"),
    ("outputs-named-differently", lambda p: build_model(p, output_names=("scores_out", "softmax_out")),
     "lacks output 'logits'"),
    ("fixed-batch-dimension", lambda p: build_model(p, input_shape=(1, 1, 28, 28)),
     "needs a dynamic batch dimension"),
    ("fails-on-a-batch", lambda p: build_model(p, fixed_reshape=True), "while running Reshape node"),
    ("unsupported-metadata-schema", lambda p: build_model(p, metadata=shipped_metadata(**{"digits.schema": "99"})),
     "schema '99' is not supported"),
    ("two-channel-metadata", lambda p: build_model(p, metadata=shipped_metadata(input_shape=json.dumps([2, 28, 28]))),
     "must have 1 (grayscale) channel"),
]


@pytest.mark.parametrize(("make", "message"), [f[1:] for f in MODEL_FAULTS], ids=[f[0] for f in MODEL_FAULTS])
def test_model_breaking_the_contract_is_refused_through_the_cli(tmp_path, make, message) -> None:
    model = make(tmp_path / "model.onnx")
    result = serve("--model", str(model), "--port", str(free_port()), "--metrics-port", "0")
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert str(model) in result.stderr  # the message names the file
    assert "Traceback" not in result.stderr


def test_a_valid_hand_built_model_is_servable(tmp_path) -> None:
    """The builder itself is sound: with the right signature the same graph loads (so the faults above
    fail for the reason they name)."""
    from service.recognition.model import load_model

    model = load_model(build_model(tmp_path / "ok.onnx"), "cpu", threads=1)
    assert model.metadata.input_shape == (1, 28, 28)


def test_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--model", str(SHIPPED_MODEL), "--port", str(free_port()), "--metrics-port", str(port))
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--max-batch-size", "0"], {}, "max-batch-size must be >= 1"),
    (["--watch-interval-s", "0"], {}, "watch-interval-s must be > 0"),
    ([], {"DIGITS_MAX_QUEUE": "lots"}, "DIGITS_MAX_QUEUE='lots'"),
    ([], {"DIGITS_DEVICE": "tpu"}, "must be one of auto, cpu, cuda"),
], ids=["flag-out-of-range", "watch-interval", "env-not-a-number", "env-bad-choice"])
def test_bad_settings_exit_2_naming_the_setting(args, env, message) -> None:
    result = serve("--model", str(SHIPPED_MODEL), "--port", "0", "--metrics-port", "0", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
