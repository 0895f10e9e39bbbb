"""HTTP/REST on the gRPC server's event loop: the Open Inference Protocol REST routes, `/v1/recognize`
for image files, and the draw-a-digit page. A thin adapter over the same Recognizer as gRPC.

    GET  /                                   the draw-a-digit page (service/api/static/index.html)
    GET  /v2                                 server metadata
    GET  /v2/health/live, /v2/health/ready   200 when true, 400 when false, empty body (the specification)
    GET  /v2/models/{model}[/versions/{v}]   model metadata;   .../ready: model readiness
    POST /v2/models/{model}[/versions/{v}]/infer   JSON tensors; Triton's binary tensor data extension too
    POST /v1/recognize                       one image file: the raw body with its Content-Type, or
                                             multipart/form-data field `image` -> JSON prediction
    POST /v1/read                            the same, of a line of digits -> JSON reading (text, boxes)

Errors are JSON, `{"error": message, "code": gRPC status name}`, with the matching 4xx/5xx status.
Bodies larger than --max-message-bytes are refused with 413 before they are read whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.api import http_bodies, listener, v2_tensors
from service.api.http_bodies import HttpError
from service.api.tracking import RequestTracker, clip
from service.api.v2_grpc import SERVER_NAME, server_version
from service.recognition.reading.reader import Reading
from service.recognition.recognizer import SHUTTING_DOWN, Recognition, RecognizeError, Recognizer
from service.telemetry.logs import cut, short
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
RECOGNIZE_ROUTE = "POST /v1/recognize"
READ_ROUTE = "POST /v1/read"
INFER_ROUTE = "POST /v2/models/{model}/infer"
# The usual gRPC -> HTTP mapping (as grpc-gateway does it).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: RecognizeError) -> web.Response:
    status = exc.status if isinstance(exc, HttpError) else HTTP_STATUS.get(exc.code, 500)
    headers = {}
    if exc.code == "RESOURCE_EXHAUSTED" and not isinstance(exc, HttpError):
        # A full queue (429, retry shortly) is not an image that is too large (413, never retry as is).
        status = 429 if exc.retry else 413
        if exc.retry:
            headers["Retry-After"] = "1"
    return web.json_response({"error": clip(exc.message), "code": exc.code}, status=status, headers=headers)


class HttpApi:
    """The aiohttp application and its lifecycle; `ready` reports the server's state."""

    def __init__(self, recognizer: Recognizer, metrics: Metrics, ready: Callable[[], bool], *,
                 max_message_bytes: int, reuse_port: bool = False, max_connections: int = 256,
                 idle_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
                 middlewares: Sequence[Middleware] = ()) -> None:
        """`middlewares` run before this adapter's own, outermost first (the server's authentication)."""
        self._recognizer = recognizer
        self._outer = list(middlewares)
        self._metrics = metrics
        self._ready = ready
        self._max_bytes = max_message_bytes
        self._reuse_port = reuse_port
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout_s
        self._bodies = http_bodies.BodyReader(max_message_bytes, body_timeout_s)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._recognize = RequestTracker(metrics, RECOGNIZE_ROUTE)
        self._read_tracker = RequestTracker(metrics, READ_ROUTE)
        self._infer = RequestTracker(metrics, INFER_ROUTE)

    def application(self) -> web.Application:
        # client_max_size: request.read() refuses (413) past the limit instead of buffering it all.
        app = web.Application(client_max_size=self._max_bytes, middlewares=[*self._outer, self._middleware])
        app.router.add_get("/", self._page)
        app.router.add_get("/v2", self._server_metadata)
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/v2/health/ready", self._server_ready)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.router.add_get(prefix, self._model_metadata)
            app.router.add_get(prefix + "/ready", self._model_ready)
            app.router.add_post(prefix + "/infer", self._model_infer)
        app.router.add_post("/v1/recognize", self._recognize_image)
        app.router.add_post("/v1/read", self._read_number)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (HTTPS with `ssl_context`); returns the bound port. Raises OSError when it
        cannot bind."""
        runner = listener.runner(self.application(), self._idle_timeout)
        await runner.setup()
        try:
            # Like the gRPC port: shared by --workers N processes (SO_REUSEPORT), else a port in use is
            # an error.
            self._server = await listener.listen(runner, host, port, max_connections=self._max_connections,
                                                 ssl_context=ssl_context, reuse_port=self._reuse_port,
                                                 handshake_timeout_s=self._idle_timeout)
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        return listener.bound_port(self._server)

    async def stop(self, grace: float) -> None:
        """Stop listening and refuse new inference calls (503), give requests in flight `grace` seconds,
        then close every connection."""
        if self._runner is None:
            return
        self._draining = True
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            log.warning("HTTP requests still running after the grace period; closing them")
        await self._runner.cleanup()
        self._runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._inflight += 1
        self._idle.clear()
        try:
            length = request.content_length
            if length is not None and length > self._max_bytes:
                # Refused from the header alone: nothing of the body is read.
                return error_response(http_bodies.too_large(length, self._max_bytes))
            if (self._draining or self._recognizer.draining) and request.method == "POST":
                # A connection kept alive from before SIGTERM: its new calls are refused like new gRPC calls.
                return error_response(HttpError(503, "UNAVAILABLE", SHUTTING_DOWN))
            encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
            if request.method == "POST" and encoding not in ("", "identity"):
                # A compressed body's size says nothing of what it inflates to (2 MB of gzip can be
                # 2 GiB); images are compressed already and tensors go as binary data. So: refused.
                return error_response(HttpError(
                    415, "INVALID_ARGUMENT", f"Content-Encoding {short(encoding)} is not accepted on uploads; "
                                             "send the body uncompressed"))
            return await handler(request)
        except RecognizeError as exc:
            return error_response(exc)
        except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
            if exc.status == 413:
                return error_response(http_bodies.too_large(request.content_length, self._max_bytes))
            message = exc.text or exc.reason
            if exc.status == 404:
                message = (f"no route {request.method} {cut(request.path)}; see GET /, GET /v2, "
                           "POST /v1/recognize, POST /v1/read")
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {cut(request.path)}; use {exc.headers.get('Allow')}"
            return web.json_response({"error": message, "code": _code(exc.status)},
                                     status=exc.status, headers=_allow(exc))
        except Exception:  # a bug: say so in JSON like every other answer, and log it with its traceback
            log.exception("HTTP %s %s failed", request.method, cut(request.path))
            return web.json_response({"error": "internal server error", "code": "INTERNAL"}, status=500)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # --- the page ---

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    # --- Open Inference Protocol: health and metadata ---

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _server_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._ready() else 400)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": server_version(),
                                  "extensions": ["binary_tensor_data"]})

    def _check_model(self, request: web.Request) -> None:
        v2_tensors.check_model(self._recognizer.model, request.match_info["model"],
                               request.match_info.get("version", ""))

    async def _model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.Response(status=200 if self._ready() else 400)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        model = self._recognizer.model
        return web.json_response({
            "name": model.name, "versions": [model.version], "platform": v2_tensors.PLATFORM,
            "inputs": [spec.as_json() for spec in v2_tensors.model_inputs(model.metadata)],
            "outputs": [spec.as_json() for spec in v2_tensors.model_outputs(model)]})

    # --- Open Inference Protocol: inference ---

    async def _model_infer(self, request: web.Request) -> web.StreamResponse:
        with self._infer.track(request.remote or "") as outcome:
            try:
                return await self._v2_infer(request)
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return error_response(exc)

    async def _v2_infer(self, request: web.Request) -> web.Response:
        self._check_model(request)
        model = self._recognizer.model
        body = await self._bodies.read(request)
        max_values = self._recognizer.config.max_images_per_request * model.metadata.height * model.metadata.width
        infer = await http_bodies.parse_infer(body, request.headers.get(http_bodies.HEADER_LENGTH), model, max_values)
        tensor, names, doc = infer.tensor, infer.outputs, infer.document
        binary_out, binary_default = infer.binary_outputs, infer.binary_default
        self._recognizer.admit(tensor.count)
        self._metrics.images.labels(rpc=INFER_ROUTE).inc(tensor.count)
        recognition = await v2_tensors.recognize(self._recognizer, tensor, None)
        reply: dict[str, Any] = {"model_name": recognition.model.name,
                                 "model_version": recognition.model.version, "outputs": []}
        if "id" in doc:
            reply["id"] = str(doc["id"])
        blobs = []
        for spec, array in v2_tensors.output_arrays(recognition, names):
            out: dict[str, Any] = spec.as_json()
            if binary_out.get(spec.name, binary_default):
                blobs.append(array.tobytes())
                out["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                out["data"] = array.reshape(-1).tolist()
            reply["outputs"].append(out)
        text = json.dumps(reply).encode()
        if not blobs:
            return web.Response(body=text, content_type="application/json")
        return web.Response(body=b"".join([text, *blobs]), content_type="application/octet-stream",
                            headers={http_bodies.HEADER_LENGTH: str(len(text))})

    # --- /v1/recognize ---

    async def _recognize_image(self, request: web.Request) -> web.Response:
        with self._recognize.track(request.remote or "") as outcome:
            try:
                image = await self._bodies.image(request)
                self._metrics.images.labels(rpc=RECOGNIZE_ROUTE).inc()
                recognition = await self._recognizer.recognize([image])
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return error_response(exc)
            return web.json_response(_prediction(recognition))

    async def _read_number(self, request: web.Request) -> web.Response:
        with self._read_tracker.track(request.remote or "") as outcome:
            try:
                image = await self._bodies.image(request)
                self._metrics.images.labels(rpc=READ_ROUTE).inc()
                model = self._recognizer.model
                [reading] = await self._recognizer.read([image])
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return error_response(exc)
            return web.json_response({**_reading(reading), "model": {"name": model.name, "version": model.version}})

def _code(status: int) -> str:
    reverse = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}
    return reverse.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _prediction(recognition: Recognition) -> dict[str, Any]:
    digit = int(recognition.digits[0])
    reason = str(recognition.reasons[0])
    return {"digit": digit, "confidence": float(recognition.confidences[0]),
            "probabilities": recognition.probabilities[0].tolist(),
            "accepted": not reason, "rejection": reason or None,
            "model": {"name": recognition.model.name, "version": recognition.model.version}}


def _reading(reading: Reading) -> dict[str, Any]:
    return {"text": reading.text, "confidence": reading.confidence, "accepted": reading.accepted,
            "rejection": reading.rejection or None,
            "digits": [{"digit": d.digit, "confidence": d.confidence, "accepted": not d.rejection,
                        "rejection": d.rejection or None, "box": [d.box.x, d.box.y, d.box.width, d.box.height]}
                       for d in reading.digits]}
