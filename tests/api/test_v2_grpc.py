"""The Open Inference Protocol (KServe v2) over gRPC, driven by the real `tritonclient[grpc]` package:
a client nobody here wrote, so passing means existing Triton/KServe clients interoperate."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.client import DigitsClient
from service.gen.inference import grpc_predict_v2_pb2 as ours
from service.recognition.preprocess import normalize
from tests.harness import ServerThread, fixture_digits, free_port

MAX_IMAGES = 64


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(max_images_per_request=MAX_IMAGES, max_batch_size=64, metrics_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = fixture_digits()
    return images[:MAX_IMAGES], labels[:MAX_IMAGES]


@pytest.fixture(scope="module")
def recognized(server: ServerThread, digits) -> np.ndarray:
    """What our own Recognize API answers for the digits (probabilities [n, 10])."""
    with DigitsClient(server.target) as own:
        reply = own.recognize(list(digits[0]))
    return np.array([p.probabilities for p in reply.predictions], dtype=np.float32)


def normalized(server: ServerThread, images: np.ndarray) -> np.ndarray:
    """[n,1,28,28] FP32 in the model's input space, normalized the way its metadata says."""
    meta = server.recognizer.model.metadata
    return normalize(images, meta.normalization)


def scrape(server: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def infer_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _fields(descriptor: Descriptor) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else "")
            for f in descriptor.fields}


def _messages(descriptor: Descriptor) -> Iterator[Descriptor]:
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


# Triton's extension messages, which we carry only in part: each field we have is theirs exactly.
EXTENSION_SUBSETS = {"inference.ModelConfig", "inference.ModelInput", "inference.ModelOutput",
                     "inference.ModelStatistics", "inference.InferStatistics"}


def test_proto_matches_tritonclient_stubs_field_for_field() -> None:
    """Every message, field name, number and type we define is exactly what tritonclient's stubs say
    (for Triton's extension messages we fill only part of, each of our fields is exactly theirs)."""
    theirs = triton_pb2.DESCRIPTOR.pool
    checked = 0
    for top in ours.DESCRIPTOR.message_types_by_name.values():
        for message in _messages(top):
            mine, their = _fields(message), _fields(theirs.FindMessageTypeByName(message.full_name))
            if message.full_name in EXTENSION_SUBSETS:
                assert mine.items() <= their.items(), message.full_name
            else:
                assert mine == their, message.full_name
            checked += 1
    assert checked >= 30
    data_type = ours.DESCRIPTOR.enum_types_by_name["DataType"]
    their_type = theirs.FindEnumTypeByName("inference.DataType")
    assert [(v.name, v.number) for v in data_type.values] == [(v.name, v.number) for v in their_type.values]
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == their_service.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        theirs_m = their_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            theirs_m.input_type.full_name, theirs_m.output_type.full_name)
    assert {m.name for m in service.methods} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                  "ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics",
                                                  "RepositoryIndex"}


def test_liveness_readiness_and_metadata(server: ServerThread, client) -> None:
    model = server.recognizer.model
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("lenet5")
    assert client.is_model_ready("lenet5", model.version)
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "digits" and meta["version"]
    info = client.get_model_metadata("lenet5", as_json=True)
    assert info["name"] == "lenet5" and info["versions"] == [model.version]
    assert info["platform"] == "onnxruntime_onnx"
    # JSON renders int64 as strings (protobuf's JSON mapping).
    assert info["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert info["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]},
                               {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]},
                               {"name": "accepted", "datatype": "BOOL", "shape": ["-1"]}]


def test_raw_fp32_inference_agrees_with_recognize(server, client, digits, recognized) -> None:
    images, _ = digits
    result = client.infer("lenet5", [infer_input("image", normalized(server, images), "FP32")],
                          request_id="req-7")
    probabilities = result.as_numpy("probabilities")
    logits = result.as_numpy("logits")
    assert probabilities.shape == logits.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities, recognized, atol=1e-5)
    assert (probabilities.argmax(axis=1) == recognized.argmax(axis=1)).all()
    # The two outputs are one prediction: softmax(logits / T) == probabilities, T the model's calibration.
    calibration = server.server.recognizer.model.metadata.calibration
    scaled = logits / (calibration.temperature if calibration is not None else 1.0)
    softmax = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), probabilities, atol=1e-5)
    response = result.get_response()
    assert response.id == "req-7" and response.model_name == "lenet5"
    assert response.model_version == server.recognizer.model.version


def test_raw_uint8_pixels_are_normalized_by_the_server(client, digits, recognized) -> None:
    images, _ = digits
    result = client.infer("lenet5", [infer_input("image", images[:, None, :, :], "UINT8")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), recognized, atol=1e-5)


def test_typed_contents_are_answered_in_typed_contents(server, digits, recognized) -> None:
    """tritonclient's own stubs with `contents` instead of raw bytes (as other v2 clients send)."""
    images, _ = digits
    request = triton_pb2.ModelInferRequest(model_name="lenet5")
    fp32 = request.inputs.add(name="image", datatype="FP32", shape=[8, 1, 28, 28])
    fp32.contents.fp32_contents.extend(normalized(server, images[:8]).reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(server.target) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelInfer(request, timeout=30)
        assert not reply.raw_output_contents
        assert [o.name for o in reply.outputs] == ["probabilities"]
        got = np.array(reply.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(list(reply.outputs[0].shape))
        np.testing.assert_allclose(got, recognized[:8], atol=1e-5)

        uint8 = triton_pb2.ModelInferRequest(model_name="lenet5")
        pixels = uint8.inputs.add(name="image", datatype="UINT8", shape=[3, 1, 28, 28])
        pixels.contents.uint_contents.extend(images[:3].reshape(-1).tolist())
        reply = stub.ModelInfer(uint8, timeout=30)
        probabilities = next(o for o in reply.outputs if o.name == "probabilities")
        np.testing.assert_allclose(np.array(probabilities.contents.fp32_contents).reshape(3, 10), recognized[:3],
                                   atol=1e-5)


def test_requested_outputs_only(client, server, digits) -> None:
    result = client.infer("lenet5", [infer_input("image", normalized(server, digits[0][:2]), "FP32")],
                          outputs=[triton.InferRequestedOutput("logits")])
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    assert result.as_numpy("probabilities") is None and result.as_numpy("logits").shape == (2, 10)


def test_real_digits_are_recognised(server, client, digits) -> None:
    images, labels = digits
    result = client.infer("lenet5", [infer_input("image", images[:, None, :, :], "UINT8")])
    accuracy = float((result.as_numpy("probabilities").argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f} on {len(labels)} real digits"


def _error(client: triton.InferenceServerClient, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(*args, **kwargs)
    return caught.value


def test_bad_requests_get_the_protocols_status_and_a_clear_message(server, client, digits) -> None:
    one = normalized(server, digits[0][:1])
    cases = [
        (("lenet5", [infer_input("image", one.reshape(1, 28, 28), "FP32")]), {},
         "INVALID_ARGUMENT", "shape [1, 28, 28]; expected [-1, 1, 28, 28]"),
        (("lenet5", [infer_input("image", one.astype(np.float64), "FP64")]), {},
         "INVALID_ARGUMENT", "datatype 'FP64'"),
        (("lenet5", [infer_input("pixels", one, "FP32")]), {},
         "INVALID_ARGUMENT", "unknown input 'pixels'; the model's input is 'image'"),
        (("lenet5", [infer_input("image", one, "FP32"), infer_input("image", one, "FP32")]), {},
         "INVALID_ARGUMENT", "model takes exactly one"),
        (("lenet5", [infer_input("image", np.full_like(one, np.nan), "FP32")]), {},
         "INVALID_ARGUMENT", "NaN"),
        (("lenet5", [infer_input("image", np.repeat(one, MAX_IMAGES + 1, axis=0), "FP32")]), {},
         "INVALID_ARGUMENT", "limit is 64"),
        (("lenet5", [infer_input("image", one, "FP32")]), {"outputs": [triton.InferRequestedOutput("scores")]},
         "INVALID_ARGUMENT", "unknown output 'scores'"),
        (("mnist", [infer_input("image", one, "FP32")]), {}, "NOT_FOUND", "unknown model 'mnist'"),
        (("lenet5", [infer_input("image", one, "FP32")]), {"model_version": "999"},
         "NOT_FOUND", "no version '999'"),
    ]
    for args, kwargs, status, message in cases:
        error = _error(client, *args, **kwargs)  # type: ignore[arg-type]
        assert error.status() == f"StatusCode.{status}", (message, error)
        assert message in error.message(), error.message()
    # A byte count that does not match the declared shape (a hand-built raw request).
    short = triton.InferInput("image", [1, 1, 28, 28], "FP32")
    short.set_data_from_numpy(one)  # the client checks the data against the shape...
    short.set_shape([2, 1, 28, 28])  # ...so declare a bigger one afterwards
    error = _error(client, "lenet5", [short])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "3136 bytes of raw contents; shape [2, 1, 28, 28] of FP32 needs 6272" in error.message()
    for call in (lambda: client.get_model_metadata("mnist"), lambda: client.is_model_ready("mnist")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    # ...and the server keeps serving.
    assert client.infer("lenet5", [infer_input("image", one, "FP32")]).as_numpy("probabilities").shape == (1, 10)


def test_typed_values_in_the_wrong_field_are_named(server) -> None:
    request = triton_pb2.ModelInferRequest(model_name="lenet5")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
    tensor.contents.int_contents.extend([0] * 784)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        triton_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "values go in contents.fp32_contents, not int_contents" in caught.value.details()


def test_tritons_extension_rpcs_that_its_tools_need(server, client, digits) -> None:
    """ModelConfig (perf_analyzer reads it first), ModelStatistics and RepositoryIndex, through
    tritonclient; Triton's other extensions stay UNIMPLEMENTED."""
    model = server.recognizer.model
    assert set(client.get_server_metadata(as_json=True)["extensions"]) == {
        "model_configuration", "statistics", "binary_tensor_data"}
    config = client.get_model_config("lenet5", as_json=True)["config"]
    assert config["name"] == "lenet5" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == server.config.max_images_per_request
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "28", "28"]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("logits", "TYPE_FP32", ["10"]), ("probabilities", "TYPE_FP32", ["10"])]
    assert client.get_model_repository_index(as_json=True)["models"] == [
        {"name": "lenet5", "version": model.version, "state": "READY"}]
    before = client.get_inference_statistics("lenet5", as_json=True)["model_stats"][0]
    client.infer("lenet5", [infer_input("image", normalized(server, digits[0][:5]), "FP32")])
    after = client.get_inference_statistics("lenet5", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 5
    assert int(after["execution_count"]) > int(before.get("execution_count", 0))
    success = after["inference_stats"]["success"]
    assert int(success["count"]) > int(before["inference_stats"].get("success", {}).get("count", 0))
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0 and int(after["last_inference"]) > 0
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("lenet5")
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_config("mnist")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_one_v2_request_of_n_images_is_n_images_for_the_batcher_and_the_metrics(server, client, digits) -> None:
    before = scrape(server)
    images = digits[0][:12]
    client.infer("lenet5", [infer_input("image", normalized(server, images), "FP32")])
    with pytest.raises(InferenceServerException):
        client.infer("lenet5", [infer_input("image", normalized(server, images)[:, 0], "FP32")])
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("digits_requests_total", rpc="ModelInfer", code="OK") == 1
    assert delta("digits_requests_total", rpc="ModelInfer", code="INVALID_ARGUMENT") == 1
    assert delta("digits_images_received_total", rpc="ModelInfer") == 12
    assert delta("digits_batch_size_sum") == 12  # one request alone: its 12 images ran as one batch
    assert delta("digits_request_duration_seconds_count", rpc="ModelInfer") == 2


def test_health_and_reflection_list_and_describe_the_service(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        described = database.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert described.package == "inference"
        assert "ModelInferRequest" in [m.name for m in described.message_type]
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
