"""What `digits bench` measures us against, and the tools it measures with: the floor answers
ModelInfer like a model would (shapes, names, ids) without one; Triton's perf_analyzer runs against a
real server and its report is parsed; a missing library is named, not hidden; MLServer, installed by
`make peer`, serves the same model with the same answers; the tritonclient.grpc.aio engine counts
what it sent."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from service.perf.peers import analyzer
from service.perf.peers.floor import CLASSES, FloorProcess
from service.perf.peers.mlserver import MLServerProcess, PeerUnavailable, find_mlserver
from service.perf.peers.tritonload import TritonLoad, run_triton_load
from service.recognition.model import load_model
from service.recognition.preprocess import normalize
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits


def _inputs(count: int) -> np.ndarray:
    images, _ = fixture_digits()
    meta = load_model(SHIPPED_MODEL, "cpu", 1, warmup_batch=1).metadata
    return normalize(images[:count], meta.normalization)


def _tensor(array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def test_the_floor_answers_model_infer_with_a_row_per_image_and_what_perf_analyzer_reads() -> None:
    with FloorProcess() as floor, triton.InferenceServerClient(floor.target) as client:
        assert client.is_server_ready() and client.is_model_ready("lenet5")
        config = client.get_model_config("lenet5", as_json=True)["config"]
        assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "28", "28"]}]
        assert int(config["max_batch_size"]) >= 64
        for count in (1, 3, 64):
            result = client.infer("lenet5", [_tensor(_inputs(count))], request_id=f"call-{count}",
                                  outputs=[triton.InferRequestedOutput("probabilities")])
            probabilities = result.as_numpy("probabilities")
            assert probabilities.shape == (count, CLASSES) and probabilities.dtype == np.float32
            response = result.get_response()
            assert (response.model_name, response.id) == ("lenet5", f"call-{count}")
        stats = client.get_inference_statistics("lenet5", as_json=True)["model_stats"][0]
        assert int(stats["execution_count"]) == 3
        with pytest.raises(triton.InferenceServerException) as unknown:
            client.get_model_config("mnist")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_the_tritonclient_engine_counts_images_and_requests_it_sent() -> None:
    with FloorProcess() as floor:
        tensors = [_inputs(8)[i * 4:(i + 1) * 4] for i in range(2)]
        summary = run_triton_load(TritonLoad(floor.target, "lenet5", concurrency=4, seconds=0.5, clients=2), tensors)
    assert summary.ok > 10 and summary.images == 4 * summary.ok and summary.errors == {}
    assert 0 < summary.latency_s["p50"] <= summary.latency_s["p99"]
    with pytest.raises(ValueError):
        run_triton_load(TritonLoad("127.0.0.1:1", "lenet5", 1, 0.1), [])


def test_perf_analyzer_runs_against_a_real_server_and_its_report_is_parsed(tmp_path: Path) -> None:
    tool = analyzer.find_analyzer()  # make test installs libb64-0d and nvidia-cuda-runtime-cu12
    data = analyzer.write_input_data(list(_inputs(16)[:, None]), tmp_path / "data.json")
    with ServerThread() as server:
        result = analyzer.run_analyzer(tool, server.target, "lenet5", batch=2, concurrency=2, data=data,
                                       interval_ms=500, trials=3)
        metrics = server.server.metrics
        sample = metrics.registry.get_sample_value
        ok = sample("digits_requests_total", {"rpc": "ModelInfer", "code": "OK"}) or 0
        images = sample("digits_images_received_total", {"rpc": "ModelInfer"}) or 0
        failed = [s for family in metrics.requests.collect() for s in family.samples
                  if s.name.endswith("_total") and s.labels["code"] != "OK" and s.value]
    assert result.concurrency == 2 and result.images_per_s > 0
    assert 0 < result.p50_us <= result.p90_us <= result.p99_us
    assert ok > 10 and images == 2 * ok and not failed  # every request answered, 2 images each


def test_perf_analyzer_report_and_failures_are_read(tmp_path: Path) -> None:
    report = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
              "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
              "16,5146.5,6,2000,120,0,85,3,2,2600,3100,3500,4400\n")
    parsed = analyzer.parse_csv(report)
    assert (parsed.concurrency, parsed.images_per_s, parsed.p50_us, parsed.p99_us) == (16, 5146.5, 2600, 4400)
    assert (parsed.server_queue_us, parsed.server_compute_us) == (120, 88)
    with pytest.raises(analyzer.AnalyzerError):
        analyzer.parse_csv("Concurrency\n")
    # A perf_analyzer that cannot load a library is reported with what to install, not as a crash.
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\necho 'perf_analyzer: error while loading shared libraries: libb64.so.0d: "
                    "cannot open shared object file: No such file or directory' >&2\nexit 127\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(analyzer.AnalyzerError, match=r"libb64\.so\.0d.*apt-get install libb64-0d"):
        analyzer.find_analyzer(fake)


def test_mlserver_serves_the_same_model_with_the_same_answers() -> None:
    try:
        find_mlserver()
    except PeerUnavailable as exc:
        pytest.skip(str(exc))  # fails under CI=true: `make test` installs it (make peer)
    inputs = _inputs(32)
    _, expected = load_model(SHIPPED_MODEL, "cpu", 1, warmup_batch=1).run(inputs)
    with MLServerProcess(SHIPPED_MODEL) as peer, triton.InferenceServerClient(peer.target) as client:
        result = client.infer("lenet5", [_tensor(inputs)], outputs=[triton.InferRequestedOutput("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    with pytest.raises(PeerUnavailable, match="no MLServer at"):
        MLServerProcess(SHIPPED_MODEL, executable=Path("/nonexistent/mlserver"))
