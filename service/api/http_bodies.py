"""HTTP request bodies, read within the limits and parsed: an image file (the raw body or a multipart
field), and the Open Inference Protocol's JSON tensors with Triton's binary tensor data extension.

Every body counts against --max-message-bytes as a whole (multipart parts included; Content-Encoding
is refused before this), and big JSON is checked before it is parsed: json.loads holds the GIL.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from service.api import v2_tensors
from service.recognition.model import LoadedModel
from service.recognition.recognizer import RecognizeError
from service.telemetry.logs import short

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
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


class BodyReader:
    """Reads a request's body whole, never past --max-message-bytes (every multipart part counted) nor
    slower than the body timeout."""

    def __init__(self, max_bytes: int, body_timeout_s: float) -> None:
        self._max_bytes = max_bytes
        self._body_timeout = body_timeout_s

    async def image(self, request: web.Request) -> bytes:
        kind = request.content_type
        if kind == "multipart/form-data":
            return await self._multipart_image(request)
        if not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise HttpError(415, "INVALID_ARGUMENT",
                            f"Content-Type {short(kind)} is not an image: send the image file as the body with its "
                            "type (image/png, image/jpeg, ...) or as multipart/form-data field 'image'")
        body = await self.read(request)
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
                raise too_large(declared, self._max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    async def read(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise too_large(request.content_length, self._max_bytes) from exc
        except TimeoutError:
            raise self._slow_body() from None

    def _slow_body(self) -> HttpError:
        return HttpError(408, "DEADLINE_EXCEEDED",
                         f"the request body did not arrive within {self._body_timeout:g} s (--http-body-timeout-s)")


def too_large(length: int | None, limit: int) -> HttpError:
    size = f"{length} bytes" if length is not None else "the body"
    return HttpError(413, "RESOURCE_EXHAUSTED",
                     f"request body of {size} exceeds the limit of {limit} bytes (--max-message-bytes)")


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
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


def json_object(text: bytes, max_values: int) -> dict[str, Any]:
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


def flag(params: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false, nothing else ("no" is not false, it is a mistake)."""
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise RecognizeError("INVALID_ARGUMENT", f"parameter {name!r} must be true or false, got {short(value)}")
    return value


def parameters(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecognizeError("INVALID_ARGUMENT", "'parameters' must be a JSON object")
    return params


def tensor_input(tensor: dict[str, Any], binary: bytes, meta: Any) -> v2_tensors.InputTensor:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str) or not isinstance(shape, list):
        raise RecognizeError("INVALID_ARGUMENT",
                             f"input {short(name)} needs 'datatype' (a string) and 'shape' (a list of integers)")
    size = parameters(tensor).get("binary_data_size")
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


@dataclass(frozen=True)
class InferRequest:
    """A parsed `POST /v2/models/{model}/infer` body."""

    document: dict[str, Any]
    tensor: v2_tensors.InputTensor
    outputs: list[str]  # the outputs to return, in order
    binary_outputs: dict[str, bool]  # per requested output: as binary data (Triton's extension)
    binary_default: bool


async def parse_infer(body: bytes, header_length: str | None, model: LoadedModel, max_values: int) -> InferRequest:
    """The JSON header (and binary tensor data after it) of a v2 inference request, validated.

    Parsing a big JSON document takes long enough to stall every other request on the event loop: big
    ones are parsed on a thread (after `json_object`'s counts have bounded how long that takes)."""
    header, binary = split_binary(body, header_length)
    big = len(header) > INLINE_JSON_BYTES
    doc = await asyncio.to_thread(json_object, header, max_values) if big else json_object(header, max_values)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise RecognizeError("INVALID_ARGUMENT", "'inputs' must be a list of tensor objects")
    v2_tensors.check_input_names([str(i.get("name")) for i in inputs], model.metadata)
    tensor = await asyncio.to_thread(tensor_input, inputs[0], binary, model.metadata) if big else \
        tensor_input(inputs[0], binary, model.metadata)
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise RecognizeError("INVALID_ARGUMENT", "'outputs' must be a list of objects with a 'name'")
    names = v2_tensors.select_outputs([str(o.get("name")) for o in outputs], model)
    binary_default = flag(parameters(doc), "binary_data_output", False)
    as_binary = {str(o.get("name")): flag(parameters(o), "binary_data", binary_default) for o in outputs}
    return InferRequest(doc, tensor, names, as_binary, binary_default)
