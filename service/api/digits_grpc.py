"""The `digits.v1.DigitRecognizer` servicer: translate protobuf to the core's types and back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from service.api.messages import Undecodable, add_tolerant
from service.api.tracking import RequestTracker, abort, clip, deadline_of
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.preprocess import Payload, RawImage
from service.recognition.reading.reader import Reading
from service.recognition.recognizer import SHUTTING_DOWN, Recognition, RecognizeError, Recognizer
from service.telemetry.logs import short
from service.telemetry.metrics import GRPC_RPCS, Metrics

log = logging.getLogger(__name__)

Reply = TypeVar("Reply", digits_pb2.StreamResponse, digits_pb2.ReadStreamResponse)
DTYPE_NAMES = {digits_pb2.DTYPE_UINT8: "uint8", digits_pb2.DTYPE_FLOAT32: "float32"}


def to_payload(image: digits_pb2.Image, index: int) -> Payload:
    """One protobuf Image -> the core's payload (bytes are referenced, not copied)."""
    kind = image.WhichOneof("payload")
    if kind == "encoded":
        return image.encoded
    if kind == "raw":
        raw = image.raw
        dtype = DTYPE_NAMES.get(raw.dtype)
        if dtype is None:
            raise RecognizeError("INVALID_ARGUMENT",
                                 f"image {index}: raw pixels need dtype DTYPE_UINT8 or DTYPE_FLOAT32, got {raw.dtype}")
        return RawImage(width=raw.width, height=raw.height, dtype=dtype, data=raw.data)
    raise RecognizeError("INVALID_ARGUMENT", f"image {index}: has neither encoded bytes nor raw pixels")


# rejection.REASONS -> the proto enum; "" (accepted) is REJECTION_NONE.
REJECTIONS = {"": digits_pb2.REJECTION_NONE, "no_ink": digits_pb2.REJECTION_NO_INK,
              "not_a_digit": digits_pb2.REJECTION_NOT_A_DIGIT, "uncertain": digits_pb2.REJECTION_UNCERTAIN}


def predictions(recognition: Recognition) -> Iterator[digits_pb2.Prediction]:
    """One Prediction per image, in order."""
    for row, digit, reason in zip(recognition.probabilities.tolist(), recognition.digits.tolist(),
                                  recognition.reasons.tolist(), strict=True):
        yield digits_pb2.Prediction(digit=digit, confidence=row[digit], probabilities=row,
                                    accepted=not reason, rejection=REJECTIONS[reason])


def reading_of(reading: Reading) -> digits_pb2.Reading:
    """One Reading: the text, its confidence, and per digit its prediction and box."""
    digits = [digits_pb2.ReadDigit(
        prediction=digits_pb2.Prediction(digit=d.digit, confidence=d.confidence,
                                         probabilities=d.probabilities.tolist(), accepted=not d.rejection,
                                         rejection=REJECTIONS[d.rejection]),
        box=digits_pb2.Box(x=d.box.x, y=d.box.y, width=d.box.width, height=d.box.height)) for d in reading.digits]
    return digits_pb2.Reading(text=reading.text, confidence=reading.confidence, accepted=reading.accepted,
                              digits=digits, rejection=REJECTIONS[reading.rejection])


def model_ref(recognition: Recognition) -> digits_pb2.ModelRef:
    return digits_pb2.ModelRef(name=recognition.model.name, version=recognition.model.version)


class DigitRecognizerServicer(digits_pb2_grpc.DigitRecognizerServicer):
    """Thin adapter: protobuf <-> Recognizer."""

    def __init__(self, recognizer: Recognizer, metrics: Metrics) -> None:
        self._recognizer = recognizer
        self._metrics = metrics
        self._unary = RequestTracker(metrics, "Recognize")
        self._stream = RequestTracker(metrics, "RecognizeStream")
        self._read = RequestTracker(metrics, "Read")
        self._read_stream = RequestTracker(metrics, "ReadStream")
        self.open_streams = 0  # a drain waits for these (server.app)
        self._images = {rpc: metrics.images.labels(rpc=rpc) for rpc in GRPC_RPCS}

    async def Recognize(self, request: digits_pb2.RecognizeRequest,
                        context: grpc.aio.ServicerContext) -> digits_pb2.RecognizeResponse:
        deadline = deadline_of(context)
        return await self._unary.answer(context, deadline, self._recognize(request, deadline))

    async def _recognize(self, request: digits_pb2.RecognizeRequest,
                         deadline: float | None) -> digits_pb2.RecognizeResponse:
        # Counted once the request's size is known to be acceptable: a refused request of millions of
        # empty images must not add millions to the counter.
        self._recognizer.admit(len(request.images))
        self._metrics.images.labels(rpc="Recognize").inc(len(request.images))
        payloads = [to_payload(image, i) for i, image in enumerate(request.images)]
        recognition = await self._recognizer.recognize(payloads, deadline)
        return digits_pb2.RecognizeResponse(predictions=predictions(recognition), model=model_ref(recognition))

    async def Read(self, request: digits_pb2.ReadRequest, context: grpc.aio.ServicerContext) -> digits_pb2.ReadResponse:
        deadline = deadline_of(context)
        return await self._read.answer(context, deadline, self._read_numbers(request, deadline))

    async def _read_numbers(self, request: digits_pb2.ReadRequest, deadline: float | None) -> digits_pb2.ReadResponse:
        self._recognizer.admit(len(request.images))
        self._metrics.images.labels(rpc="Read").inc(len(request.images))
        payloads = [to_payload(image, i) for i, image in enumerate(request.images)]
        model = self._recognizer.model
        readings = await self._recognizer.read(payloads, deadline)
        return digits_pb2.ReadResponse(readings=[reading_of(r) for r in readings],
                                       model=digits_pb2.ModelRef(name=model.name, version=model.version))

    async def RecognizeStream(self, request_iterator: AsyncIterator[digits_pb2.StreamRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[digits_pb2.StreamResponse]:
        """Every image is recognized concurrently (so a stream's images batch together); answers go
        out as they are ready, each carrying its request's id (`_serve_stream`)."""
        # grpc.aio serves a stream from an async generator function. aclosing closes the inner one the
        # moment grpc closes this one (a cancelled call), rather than leaving it to asyncio's finalizer hook.
        async with contextlib.aclosing(self._serve_stream(request_iterator, context, self._stream,
                                                          self._one)) as replies:
            async for reply in replies:
                yield reply

    async def ReadStream(self, request_iterator: AsyncIterator[digits_pb2.StreamRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[digits_pb2.ReadStreamResponse]:
        """`Read` over a stream: every image is read concurrently, each reading goes out when ready with
        its request's id (`_serve_stream`)."""
        async with contextlib.aclosing(self._serve_stream(request_iterator, context, self._read_stream,
                                                          self._read_one)) as replies:
            async for reply in replies:
                yield reply

    async def _serve_stream(self, request_iterator: AsyncIterator[digits_pb2.StreamRequest],
                            context: grpc.aio.ServicerContext, tracker: RequestTracker,
                            one: Callable[[digits_pb2.StreamRequest, float | None, str], Awaitable[Reply]],
                            ) -> AsyncGenerator[Reply, None]:
        """Answer every message of a stream with `one`, concurrently, as the answers are ready.

        Backpressure: at most `window` of the stream's images are in the server at once, counted from
        when a message is read until its answer has been written to the client. A client that writes
        and never reads therefore sees the server stop reading its stream (HTTP/2 flow control does the
        rest), and the server holds at most `window` answers for it.
        """
        if self._recognizer.draining:  # a stream opened before the drain keeps being served, a new one not
            await self._refuse_stream(context, tracker, RecognizeError("UNAVAILABLE", SHUTTING_DOWN))
        window_size = max(1, 4 * self._recognizer.config.max_batch_size)
        window = asyncio.Semaphore(window_size)
        answers: asyncio.Queue[Reply | None] = asyncio.Queue(maxsize=window_size + 1)
        deadline = deadline_of(context)
        peer = context.peer()
        refused: list[RecognizeError] = []
        images = self._images[tracker.rpc]

        async def answer(message: digits_pb2.StreamRequest) -> None:
            await answers.put(await one(message, deadline, peer))

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for message in request_iterator:
                    if isinstance(message, Undecodable):
                        refused.append(RecognizeError("INVALID_ARGUMENT", f"stream message: {message.message}"))
                        break
                    await window.acquire()
                    images.inc()
                    task = asyncio.create_task(answer(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await answers.put(None)

        reader = asyncio.create_task(read())
        self.open_streams += 1
        try:
            while (reply := await answers.get()) is not None:
                yield reply  # returns once grpc has taken the message for the wire
                window.release()
            await reader  # surfaces a read error as the stream's status
        finally:
            self.open_streams -= 1
            reader.cancel()
        if refused:
            await self._refuse_stream(context, tracker, refused[0])

    async def _refuse_stream(self, context: grpc.aio.ServicerContext, tracker: RequestTracker,
                             error: RecognizeError) -> None:
        """End the whole stream with `error`, counted as one answered request."""
        with tracker.track(context.peer) as outcome:
            outcome["code"], outcome["reason"] = error.code, error.message
        await abort(context, error.code, error.message)

    def _model_ref(self) -> digits_pb2.ModelRef:
        model = self._recognizer.model
        return digits_pb2.ModelRef(name=model.name, version=model.version)

    async def _one(self, message: digits_pb2.StreamRequest, deadline: float | None,
                   peer: str) -> digits_pb2.StreamResponse:
        with self._stream.track(peer, deadline) as outcome:
            try:
                recognition = await self._recognizer.recognize([_stream_payload(message)], deadline)
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return digits_pb2.StreamResponse(id=message.id, error=_stream_error(exc), model=self._model_ref())
            prediction = next(predictions(recognition))
            return digits_pb2.StreamResponse(id=message.id, prediction=prediction, model=model_ref(recognition))

    async def _read_one(self, message: digits_pb2.StreamRequest, deadline: float | None,
                        peer: str) -> digits_pb2.ReadStreamResponse:
        with self._read_stream.track(peer, deadline) as outcome:
            try:
                model = self._model_ref()  # the model that reads it: a reload may swap it meanwhile
                (reading,) = await self._recognizer.read([_stream_payload(message)], deadline)
            except RecognizeError as exc:
                outcome["code"], outcome["reason"] = exc.code, exc.message
                return digits_pb2.ReadStreamResponse(id=message.id, error=_stream_error(exc),
                                                     model=self._model_ref())
            return digits_pb2.ReadStreamResponse(id=message.id, reading=reading_of(reading), model=model)


def _stream_payload(message: digits_pb2.StreamRequest) -> Payload:
    if not message.HasField("image"):
        raise RecognizeError("INVALID_ARGUMENT", f"stream message {short(message.id)} has no image")
    return to_payload(message.image, 0)


def _stream_error(exc: RecognizeError) -> digits_pb2.StreamError:
    return digits_pb2.StreamError(code=exc.code, message=clip(exc.message))


def add_to_server(servicer: DigitRecognizerServicer, server: Any, metrics: Metrics) -> None:
    add_tolerant(digits_pb2_grpc.add_DigitRecognizerServicer_to_server, servicer, server, metrics)
