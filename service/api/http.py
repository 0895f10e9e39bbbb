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
import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Middleware

from service.api import listener, v2_tensors
from service.api.tracking import RequestTracker, clip
from service.api.v2_grpc import SERVER_NAME, server_version
from service.recognition.reading.reader import Reading
from service.recognition.recognizer import Recognition, RecognizeError, Recognizer
from service.telemetry.logs import cut, short
from service.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
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
# JSON documents bigger than this are parsed on a thread, not on the event loop.
INLINE_JSON_BYTES = 256 * 1024
# Parts a multipart upload may have: the image, and a few form fields a browser may add.
MAX_PARTS = 16
# Keys a JSON request body may have (see _json_object).
MAX_JSON_KEYS = 4096


class HttpError(RecognizeError):
    """A refusal with an HTTP status of its own (413, 415, ...) besides its gRPC code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


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
        self._body_timeout = body_timeout_s
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
                return error_response(_too_large(length, self._max_bytes))
            if self._draining and request.method == "POST":
                # A connection kept alive from before SIGTERM: its new calls are refused like new gRPC calls.
                return error_response(HttpError(503, "UNAVAILABLE", "server is shutting down; retry elsewhere"))
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
                return error_response(_too_large(request.content_length, self._max_bytes))
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
        body = await self._read(request)
        header, binary = _split_binary(body, request.headers.get(HEADER_LENGTH))
        # Parsing a big JSON document (millions of keys or values) takes long enough to stall every
        # other request on the event loop: big ones go to a thread.
        big = len(header) > INLINE_JSON_BYTES
        max_values = self._recognizer.config.max_images_per_request * model.metadata.height * model.metadata.width
        doc = await asyncio.to_thread(_json_object, header, max_values) if big else _json_object(header, max_values)
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            raise RecognizeError("INVALID_ARGUMENT", "'inputs' must be a list of tensor objects")
        v2_tensors.check_input_names([str(i.get("name")) for i in inputs], model.metadata)
        tensor = await asyncio.to_thread(_input, inputs[0], binary, model.metadata) if big else \
            _input(inputs[0], binary, model.metadata)
        outputs = doc.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise RecognizeError("INVALID_ARGUMENT", "'outputs' must be a list of objects with a 'name'")
        names = v2_tensors.select_outputs([str(o.get("name")) for o in outputs], model)
        binary_default = _flag(_parameters(doc), "binary_data_output", False)
        binary_out = {str(o.get("name")): _flag(_parameters(o), "binary_data", binary_default) for o in outputs}
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
                            headers={HEADER_LENGTH: str(len(text))})

    # --- /v1/recognize ---

    async def _recognize_image(self, request: web.Request) -> web.Response:
        with self._recognize.track(request.remote or "") as outcome:
            try:
                image = await self._image(request)
                self._metrics.images.labels(rpc=RECOGNIZE_ROUTE).inc()
                recognition = await self._recognizer.recognize([image])
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return error_response(exc)
            return web.json_response(_prediction(recognition))

    async def _read_number(self, request: web.Request) -> web.Response:
        with self._read_tracker.track(request.remote or "") as outcome:
            try:
                image = await self._image(request)
                self._metrics.images.labels(rpc=READ_ROUTE).inc()
                model = self._recognizer.model
                [reading] = await self._recognizer.read([image])
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return error_response(exc)
            return web.json_response({**_reading(reading), "model": {"name": model.name, "version": model.version}})

    async def _image(self, request: web.Request) -> bytes:
        kind = request.content_type
        if kind == "multipart/form-data":
            return await self._multipart_image(request)
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise HttpError(415, "INVALID_ARGUMENT",
                            f"Content-Type {short(kind)} is not an image: send the image file as the body with its "
                            "type (image/png, image/jpeg, ...) or as multipart/form-data field 'image'")
        body = await self._read(request)
        if not body:
            raise RecognizeError("INVALID_ARGUMENT", "the body is empty: send an image file")
        return body

    async def _multipart_image(self, request: web.Request) -> bytes:
        """The first file part (or field `image`). Every part, file or not, is read and counted against
        --max-message-bytes, at most MAX_PARTS of them, none nested: a multipart body costs no more than
        a raw one of the same size."""
        budget = [self._max_bytes]
        try:
            async with asyncio.timeout(self._body_timeout):
                return await self._multipart_parts(request, budget)
        except TimeoutError:
            raise self._slow_body() from None

    async def _multipart_parts(self, request: web.Request, budget: list[int]) -> bytes:
        image: bytes | None = None
        try:
            reader = await request.multipart()
            for count in itertools.count(1):
                part = await reader.next()
                if part is None:
                    break
                if count > MAX_PARTS:
                    raise RecognizeError("INVALID_ARGUMENT", f"multipart/form-data body has more than {MAX_PARTS} "
                                                             "parts; send the image as field 'image'")
                if not isinstance(part, BodyPartReader):
                    raise RecognizeError("INVALID_ARGUMENT", "nested multipart bodies are not accepted")
                data = await self._read_part(part, request.content_length, budget)
                if image is None and (part.name == "image" or part.filename):
                    if not data:
                        raise RecognizeError("INVALID_ARGUMENT", f"multipart field {short(part.name)} is empty")
                    image = data
        except (ValueError, AssertionError, RecursionError) as exc:  # aiohttp's errors for malformed bodies
            raise RecognizeError("INVALID_ARGUMENT",
                                 f"malformed multipart/form-data body: {short(str(exc))}") from exc
        if image is None:
            raise RecognizeError("INVALID_ARGUMENT",
                                 "multipart/form-data body has no file field: send the image as field 'image'")
        return image

    async def _read_part(self, part: BodyPartReader, declared: int | None, budget: list[int]) -> bytes:
        # A multipart stream is not bounded by client_max_size: count while reading (chunked uploads),
        # every part against one budget for the whole body.
        chunks: list[bytes] = []
        while chunk := await part.read_chunk():
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _too_large(declared, self._max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _read(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _too_large(request.content_length, self._max_bytes) from exc
        except TimeoutError:
            raise self._slow_body() from None

    def _slow_body(self) -> HttpError:
        return HttpError(408, "DEADLINE_EXCEEDED",
                         f"the request body did not arrive within {self._body_timeout:g} s (--http-body-timeout-s)")


def _too_large(length: int | None, limit: int) -> HttpError:
    size = f"{length} bytes" if length is not None else "the body"
    return HttpError(413, "RESOURCE_EXHAUSTED",
                     f"request body of {size} exceeds the limit of {limit} bytes (--max-message-bytes)")


def _code(status: int) -> str:
    reverse = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}
    return reverse.get(status, "INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it (Triton's binary tensor data extension)."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
        if not 0 <= length <= len(body):
            raise ValueError
    except ValueError:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"{HEADER_LENGTH} {header_length!r} must be an integer 0..{len(body)} (the body's size)") from None
    return body[:length], body[length:]


def _json_object(text: bytes, max_values: int) -> dict[str, Any]:
    # json.loads holds the GIL while it runs, on a thread or not, so a document with millions of keys
    # or values would stall the event loop for a second: count them first (colons and commas; those
    # inside strings only make the counts safer). A v2 request has a handful of keys, and at most
    # --max-images-per-request images' worth of values.
    if text.count(b":") > MAX_JSON_KEYS:
        raise RecognizeError("INVALID_ARGUMENT", f"request body has more than {MAX_JSON_KEYS} JSON keys; a v2 "
                                                 "inference request needs a few (send tensor values in 'data')")
    if text.count(b",") > max_values + MAX_JSON_KEYS:
        raise RecognizeError("INVALID_ARGUMENT", f"request body has more than {max_values} values: more than "
                                                 "--max-images-per-request images' worth")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecognizeError("INVALID_ARGUMENT", f"request body is not valid JSON: {short(str(exc))}") from exc
    except RecursionError:
        raise RecognizeError("INVALID_ARGUMENT", "request body is JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise RecognizeError("INVALID_ARGUMENT", "request body must be a JSON object with 'inputs'")
    return doc


def _flag(params: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false, nothing else ("no" is not false, it is a mistake)."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise RecognizeError("INVALID_ARGUMENT", f"parameter {name!r} must be true or false, got {short(value)}")
    return value


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecognizeError("INVALID_ARGUMENT", "'parameters' must be a JSON object")
    return params


def _input(tensor: dict[str, Any], binary: bytes, meta: Any) -> v2_tensors.InputTensor:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str) or not isinstance(shape, list):
        raise RecognizeError("INVALID_ARGUMENT",
                             f"input {short(name)} needs 'datatype' (a string) and 'shape' (a list of integers)")
    size = _parameters(tensor).get("binary_data_size")
    if size is None:
        if binary:
            raise RecognizeError("INVALID_ARGUMENT",
                                 f"the body has {len(binary)} bytes of binary data but input {short(name)} has no "
                                 "parameters.binary_data_size")
        if "data" not in tensor:
            raise RecognizeError("INVALID_ARGUMENT", f"input {short(name)} has no 'data'")
        return v2_tensors.from_values(str(name), datatype, shape, tensor["data"], meta)
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} declares binary_data_size {short(size)}; the body carries {len(binary)} bytes after "
            f"the {HEADER_LENGTH} JSON header")
    return v2_tensors.from_raw(str(name), datatype, shape, binary, meta)


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
