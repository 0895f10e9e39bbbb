"""Start-up, provider selection, health transitions and graceful shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import onnx
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import DigitsClient
from service.recognition.model import (
    CPU,
    CUDA,
    ModelLoadError,
    available_cpus,
    cgroup_cpu_quota,
    choose_providers,
    default_threads,
    load_model,
)
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port, wait_serving, wait_until

DIGIT, LABEL = fixture_digits()[0][0], int(fixture_digits()[1][0])


def test_provider_choice() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    assert choose_providers("cuda", ["TensorrtExecutionProvider", CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ModelLoadError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        choose_providers("cuda", [CPU])


def test_cuda_never_falls_back_silently() -> None:
    """Even when the provider list claims CUDA, a session that did not get it fails --device cuda."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        model = load_model(SHIPPED_MODEL, "cuda")
        assert model.provider == CUDA
        return
    with pytest.raises(ModelLoadError, match="could not start the CUDA provider"):
        load_model(SHIPPED_MODEL, "cuda", available=[CUDA, CPU])


def test_auto_uses_what_the_session_really_runs_on() -> None:
    import onnxruntime as ort

    model = load_model(SHIPPED_MODEL, "auto")
    expected = CUDA if CUDA in ort.get_available_providers() else CPU
    assert model.provider == expected
    assert model.providers == tuple(model.session.get_providers())


def test_thread_default_follows_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    # --threads 0 leaves one CPU per process to its event loop.
    assert [default_threads(1, cpus) for cpus in (1, 2, 16)] == [1, 1, 15]
    assert default_threads(8, 16) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from service.recognition.model import available_cpus; print(available_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def _without_metadata(tmp_path: Path, key: str) -> Path:
    model = onnx.load(str(SHIPPED_MODEL))
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    path = tmp_path / f"no-{key}.onnx"
    onnx.save(model, str(path))
    return path


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--metrics-port", "0", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("make_model", "message"), [
    (lambda tmp: tmp / "missing.onnx", "model file not found"),
    (lambda tmp: (tmp / "corrupt.onnx").write_bytes(b"\x08\x07garbage") and tmp / "corrupt.onnx",
     "not a valid ONNX model"),
    (lambda tmp: _without_metadata(tmp, "normalization"), "missing normalization"),
], ids=["missing", "corrupt", "no-normalization"])
def test_unservable_model_is_refused_with_clear_message(tmp_path: Path, make_model, message) -> None:
    result = _serve("--model", str(make_model(tmp_path)), "--port", str(free_port()))
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with ServerThread() as running:
        result = _serve("--model", str(SHIPPED_MODEL), "--port", str(running.server.port))
    assert result.returncode == 1
    assert "is the port already in use" in result.stderr


def test_shutdown_drains_in_flight_requests_and_refuses_new_ones() -> None:
    running = ServerThread(max_batch_delay_ms=400, max_batch_size=64).start()
    try:
        channel = grpc.insecure_channel(running.target)
        from service.client import to_image
        from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc

        stub = digits_pb2_grpc.DigitRecognizerStub(channel)
        request = digits_pb2.RecognizeRequest(images=[to_image(DIGIT)])
        pending = [stub.Recognize.future(request, timeout=30) for _ in range(5)]
        recognizer = running.server.recognizer
        assert recognizer is not None
        wait_until(lambda: recognizer.queued_images == 5, what="5 requests queued")
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=running.stop, kwargs={"grace": 10})
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        replies = [f.result() for f in pending]  # every in-flight request completes
        assert all(len(r.predictions) == 1 for r in replies)
        stopper.join(30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recognize(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        running.stop()


def test_sigterm_exits_zero_after_serving(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL),
                             "--port", str(port),
                             "--metrics-port", "0", "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        with DigitsClient(f"127.0.0.1:{port}", timeout=5) as client:
            assert client.recognize([DIGIT]).predictions[0].digit == LABEL
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert '"message": "serving"' in stderr and '"message": "stopped"' in stderr
    # --device auto: CUDA first exactly when this onnxruntime offers it.
    expected = '["CUDAExecutionProvider", "CPUExecutionProvider"]' if "CUDAExecutionProvider" in \
        ort.get_available_providers() else '["CPUExecutionProvider"]'
    assert f'"providers": {expected}' in stderr
