"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`, a thin adapter.

Served on the same port as DigitRecognizer, through the same Recognizer (batcher, limits, metrics).
Tensor rules live in `service.api.v2_tensors`, shared with the REST adapter. RPCs of Triton's superset
that are not in the specification (repository, statistics, ...) answer UNIMPLEMENTED, as gRPC does
for any method a server does not register.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from service.api import v2_tensors
from service.api.messages import add_tolerant
from service.api.tracking import RequestTracker, abort, deadline_of
from service.gen.inference import grpc_predict_v2_pb2 as pb
from service.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.recognition.recognizer import RecognizeError, Recognizer
from service.telemetry.logs import short
from service.telemetry.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "digits"
# Triton's protocol extensions this server supports (ServerMetadata lists them for clients to check).
EXTENSIONS = ("model_configuration", "statistics", "binary_tensor_data")
DATA_TYPES = {"FP32": pb.TYPE_FP32, "UINT8": pb.TYPE_UINT8, "BOOL": pb.TYPE_BOOL}
# Typed contents: the InferTensorContents field that carries each supported datatype.
CONTENTS_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


def server_version() -> str:
    try:
        return importlib.metadata.version("digits")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin adapter: v2 protobuf <-> v2_tensors <-> Recognizer. `ready` reports the server's state."""

    def __init__(self, recognizer: Recognizer, metrics: Metrics, ready: Callable[[], bool]) -> None:
        self._recognizer = recognizer
        self._metrics = metrics
        self._ready = ready
        self._tracker = RequestTracker(metrics, "ModelInfer")
        self._images = metrics.images.labels(rpc="ModelInfer")

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        await self._check_model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        model = self._recognizer.model
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=v2_tensors.PLATFORM,
            inputs=[_tensor_metadata(spec) for spec in v2_tensors.model_inputs(model.metadata)],
            outputs=[_tensor_metadata(spec) for spec in v2_tensors.model_outputs(model)])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        """Triton's model configuration: what perf_analyzer reads before it sends a request."""
        await self._check_model(request.name, request.version, context)
        model = self._recognizer.model
        inputs = [pb.ModelInput(name=spec.name, data_type=DATA_TYPES[spec.datatype], dims=spec.shape[1:])
                  for spec in v2_tensors.model_inputs(model.metadata)]
        # The model's own outputs: `accepted` (a [N] verdict the server adds on request) has no dims of
        # its own to declare, which Triton's configuration cannot say for a batched model.
        outputs = [pb.ModelOutput(name=spec.name, data_type=DATA_TYPES[spec.datatype], dims=spec.shape[1:])
                   for spec in v2_tensors.model_outputs(model) if spec.name in model.output_names]
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=model.name, platform=v2_tensors.PLATFORM, backend="onnxruntime",
            max_batch_size=self._recognizer.config.max_images_per_request, input=inputs, output=outputs))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        """Triton's statistics, from the counters the metrics keep (every protocol's requests together)."""
        if request.name:
            await self._check_model(request.name, request.version, context)
        model = self._recognizer.model
        stats = [statistics(self._metrics, model.name, model.version)]
        # Triton's model versions are integers, and perf_analyzer finds a model's statistics by the
        # integer it parses from the version (C++ stoll: 1.0.0 reads as 1): a version that is not a
        # plain integer is listed once more under that integer, after the real one.
        alias = _integer_version(model.version)
        if alias is not None and alias != model.version:
            stats.append(statistics(self._metrics, model.name, alias))
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        model = self._recognizer.model
        state = "READY" if self._ready() else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=model.name, version=model.version, state=state)])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        deadline = deadline_of(context)
        return await self._tracker.answer(context, deadline, self._infer(request, deadline))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        model = self._recognizer.model
        v2_tensors.check_model(model, request.model_name, request.model_version)
        v2_tensors.check_input_names([tensor.name for tensor in request.inputs], model.metadata)
        raw = len(request.raw_input_contents) > 0
        if not raw and len(request.inputs) > 0 and \
                v2_tensors.typed_values(request.inputs[0].contents) > v2_tensors.INLINE_VALUES:
            # Turning millions of protobuf floats into an array takes a while: not on the event loop.
            tensor = await asyncio.to_thread(_input, request, model.metadata, raw)
        else:
            tensor = _input(request, model.metadata, raw)
        names = v2_tensors.select_outputs([out.name for out in request.outputs], model)
        self._recognizer.admit(tensor.count)
        self._images.inc(tensor.count)
        recognition = await v2_tensors.recognize(self._recognizer, tensor, deadline)
        reply = pb.ModelInferResponse(model_name=recognition.model.name,
                                      model_version=recognition.model.version, id=request.id)
        for spec, array in v2_tensors.output_arrays(recognition, names):
            out = reply.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            # The specification: answer in raw contents when the request used them (tritonclient
            # reads only raw_output_contents), else in typed contents.
            if raw:
                reply.raw_output_contents.append(array.tobytes())
            elif spec.datatype == v2_tensors.ACCEPTED_DATATYPE:
                out.contents.bool_contents.extend(array.tolist())
            else:
                out.contents.fp32_contents.extend(array.reshape(-1).tolist())
        return reply

    async def _check_model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        try:
            v2_tensors.check_model(self._recognizer.model, name, version)
        except RecognizeError as exc:
            await abort(context, exc.code, exc.message)


def _input(request: pb.ModelInferRequest, meta: Any, raw: bool) -> v2_tensors.InputTensor:
    tensor = request.inputs[0]
    if raw:
        if len(request.raw_input_contents) != len(request.inputs):
            raise RecognizeError(
                "INVALID_ARGUMENT",
                f"request has {len(request.raw_input_contents)} raw_input_contents for "
                f"{len(request.inputs)} inputs; give one per input, in order")
        if tensor.HasField("contents"):
            raise RecognizeError(
                "INVALID_ARGUMENT",
                f"input {short(tensor.name)} has both contents and raw_input_contents; use one of them")
        return v2_tensors.from_raw(tensor.name, tensor.datatype, tensor.shape, request.raw_input_contents[0],
                                   meta)
    field = CONTENTS_FIELDS.get(tensor.datatype)
    values = getattr(tensor.contents, field) if field else []
    if field and not values:
        present = [f.name for f, _ in tensor.contents.ListFields()]
        if present:
            raise RecognizeError(
                "INVALID_ARGUMENT",
                f"input {short(tensor.name)} is {short(tensor.datatype)}: its values go in contents.{field}, "
                f"not {', '.join(present)}")
    return v2_tensors.from_values(tensor.name, tensor.datatype, tensor.shape, values, meta,
                                  flat_count=v2_tensors.typed_values(tensor.contents))


def _integer_version(version: str) -> str | None:
    """The integer a version's leading digits read as (as perf_analyzer reads it), or None."""
    digits = re.match(r"\d+", version)
    return str(int(digits.group())) if digits else None


def statistics(metrics: Metrics, name: str, version: str) -> pb.ModelStatistics:
    """Triton's ModelStatistics from our metrics: successes and failures are requests (with their whole
    duration), queue is the batch-queue wait, compute_input the decoding, compute_infer session.run.

    Triton counts the compute phases per request, and perf_analyzer refuses statistics whose three
    compute counts differ; here each of them counts the requests that reached a batch (the queue's
    count), compute_input's time is the decoding (none for tensors), compute_infer's the batches'
    session.run time, each batch once (so per request it reads as the batch's time shared out), and
    compute_output's 0 (replies are built on the event loop, in the request's own time)."""
    sample = metrics.registry.get_sample_value

    batched = int(sample("digits_queue_wait_seconds_count") or 0)

    def duration(histogram: str) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=batched, ns=int((sample(f"{histogram}_sum") or 0.0) * 1e9))

    ok = fail = 0.0
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                if s.labels["code"] == "OK":
                    ok += s.value
                else:
                    fail += s.value
    total_s = sum(s.value for family in metrics.request_seconds.collect() for s in family.samples
                  if s.name.endswith("_sum"))
    requests = ok + fail
    # Request durations are kept as one histogram for all outcomes: shared out by count.
    success = pb.StatisticDuration(count=int(ok), ns=int(total_s * 1e9 * ok / requests) if requests else 0)
    failure = pb.StatisticDuration(count=int(fail), ns=int(total_s * 1e9 * fail / requests) if requests else 0)
    return pb.ModelStatistics(
        name=name, version=version, last_inference=int((sample("digits_last_inference_timestamp_seconds") or 0) * 1000),
        inference_count=int(sample("digits_batch_size_sum") or 0),
        execution_count=int(sample("digits_batch_size_count") or 0),
        inference_stats=pb.InferStatistics(
            success=success, fail=failure, queue=duration("digits_queue_wait_seconds"),
            compute_input=duration("digits_preprocess_duration_seconds"),
            compute_infer=duration("digits_inference_duration_seconds"),
            compute_output=pb.StatisticDuration(count=batched)))


def _tensor_metadata(spec: v2_tensors.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


class ReflectionPool:
    """Server reflection over protobuf's default pool plus the v2 stubs' own pool.

    The v2 stubs live in a pool of their own (see proto/generate.py: tritonclient registers the same
    `inference.*` symbols in the default one); this lets grpcurl and other reflection clients still
    describe GRPCInferenceService. Only the lookups grpc_reflection makes are provided.
    """

    def __init__(self) -> None:
        self._pools = (descriptor_pool.Default(), pb.DESCRIPTOR.pool)

    def _first(self, method: str, *args: Any) -> Any:
        missing: KeyError | None = None
        for pool in self._pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError as exc:
                missing = exc
        assert missing is not None
        raise missing

    def FindFileByName(self, name: str) -> Any:
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._first("FindMessageTypeByName", name)

    # Extensions of a message live in the pool that holds the message.
    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return message.file.pool.FindAllExtensions(message)


def add_to_server(servicer: InferenceServicer, server: Any, metrics: Metrics) -> None:
    add_tolerant(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, server, metrics)
