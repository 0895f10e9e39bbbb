"""The floor: a grpc.aio Open Inference Protocol servicer that parses ModelInfer and answers a canned
[N, 10] FP32 `probabilities` tensor: no model, no batching, no metrics. What any Python gRPC server
pays per call for the same messages, measured with the same clients as `digits serve`.

It also answers what tritonclient and perf_analyzer ask before they infer (liveness, readiness, server
and model metadata, ModelConfig, ModelStatistics, RepositoryIndex), with a model that looks like ours:
`image` FP32 [-1, 1, 28, 28] in, `probabilities` FP32 [-1, 10] out, version "1".

    python -m service.perf.peers.floor [--port N]     # prints the port, serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import grpc

from service.gen.inference import grpc_predict_v2_pb2 as pb
from service.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.perf.benchprocs import PortProcess

MODEL = "lenet5"
VERSION = "1"
CLASSES = 10
INPUT_DIMS = (1, 28, 28)
MAX_BATCH = 256


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Parses every request (grpc does, into the generated message) and answers from a cache of
    replies by batch size; never looks at the pixels."""

    def __init__(self) -> None:
        self._replies: dict[int, pb.ModelInferResponse] = {}
        self._executions = 0

    def reply(self, count: int) -> pb.ModelInferResponse:
        reply = self._replies.get(count)
        if reply is None:
            reply = pb.ModelInferResponse(model_name=MODEL, model_version=VERSION, outputs=[
                pb.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32",
                                                        shape=[count, CLASSES])],
                raw_output_contents=[bytes(4 * CLASSES * count)])
            self._replies[count] = reply
        return reply

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        shape = request.inputs[0].shape if request.inputs else ()
        count = int(shape[0]) if shape else 1
        self._executions += 1
        reply = self.reply(count)
        if request.id:
            reply = pb.ModelInferResponse(model_name=MODEL, model_version=VERSION, id=request.id,
                                          outputs=reply.outputs, raw_output_contents=reply.raw_output_contents)
        return reply

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == MODEL)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="floor", version="0",
                                         extensions=["model_configuration", "statistics"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        await _known(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL, versions=[VERSION], platform="onnxruntime_onnx",
            inputs=[tensor(name="image", datatype="FP32", shape=[-1, *INPUT_DIMS])],
            outputs=[tensor(name="probabilities", datatype="FP32", shape=[-1, CLASSES])])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        await _known(request.name, context)
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=MODEL, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=MAX_BATCH,
            input=[pb.ModelInput(name="image", data_type=pb.TYPE_FP32, dims=list(INPUT_DIMS))],
            output=[pb.ModelOutput(name="probabilities", data_type=pb.TYPE_FP32, dims=[CLASSES])]))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        # Counts only, and the compute counts equal (perf_analyzer checks that they are).
        calls = pb.StatisticDuration(count=self._executions)
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name=MODEL, version=VERSION, execution_count=self._executions,
            inference_stats=pb.InferStatistics(success=calls, queue=calls, compute_input=calls,
                                               compute_infer=calls, compute_output=calls))])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=MODEL, version=VERSION, state="READY")])


async def _known(name: str, context: grpc.aio.ServicerContext) -> None:
    if name != MODEL:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name[:64]!r}; this server serves {MODEL!r}")


async def serve(port: int = 0, ready: asyncio.Future[int] | None = None) -> None:
    """Serve the floor on 127.0.0.1:`port` until SIGTERM (or until cancelled)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready is not None:
        ready.set_result(bound)
    else:
        print(bound, flush=True)
    stop = asyncio.Event()
    with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests run it in one)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(0)


class FloorProcess(PortProcess):
    """`python -m service.perf.peers.floor` in a subprocess; a context manager with `target`."""

    name = "floor"

    def __init__(self) -> None:
        super().__init__("the floor servicer", "service.perf.peers.floor")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.perf.peers.floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args(argv).port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
