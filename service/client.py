"""A small Python client for the DigitRecognizer API.

    from service.client import DigitsClient
    with DigitsClient("localhost:50051") as client:
        for p in client.recognize([open("seven.png", "rb").read()]).predictions:
            print(p.digit, p.confidence, p.accepted, p.rejection)
        print(client.read([open("zip-code.png", "rb").read()]).readings[0].text)

A server with --auth-token-file wants a bearer token on every call: `DigitsClient(target, token=...)`
(`read_token(path)` reads one from a token file); every call on the channel then carries it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc

ImageLike = bytes | np.ndarray  # encoded file bytes, or a 2-D uint8 (0..255) / float32 (0..1) array
T = TypeVar("T")


@dataclass(frozen=True)
class TlsOptions:
    """Client-side TLS: the CA that signed the server's certificate, plus a client pair for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def __post_init__(self) -> None:
        # One without the other would fail later, at the handshake, with a far less helpful message.
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate (--cert) and its key (--key) go together: give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


# The proto's Rejection enum -> the names the REST API, the CLI and the metrics use.
REJECTIONS = {digits_pb2.REJECTION_NO_INK: "no_ink", digits_pb2.REJECTION_NOT_A_DIGIT: "not_a_digit",
              digits_pb2.REJECTION_UNCERTAIN: "uncertain"}


@dataclass(frozen=True)
class Result:
    digit: int
    confidence: float
    probabilities: tuple[float, ...]
    accepted: bool = True
    rejection: str | None = None  # no_ink, not_a_digit or uncertain when not accepted

    @classmethod
    def from_proto(cls, p: digits_pb2.Prediction) -> Result:
        return cls(p.digit, p.confidence, tuple(p.probabilities), p.accepted, REJECTIONS.get(p.rejection))


@dataclass(frozen=True)
class Reply:
    predictions: list[Result]
    model_name: str
    model_version: str


@dataclass(frozen=True)
class ReadDigit:
    prediction: Result
    box: tuple[int, int, int, int]  # x, y, width, height in the pixels of the image as sent


@dataclass(frozen=True)
class Reading:
    text: str
    confidence: float
    accepted: bool
    digits: list[ReadDigit]
    rejection: str | None = None

    @classmethod
    def from_proto(cls, r: digits_pb2.Reading) -> Reading:
        digits = [ReadDigit(Result.from_proto(d.prediction), (d.box.x, d.box.y, d.box.width, d.box.height))
                  for d in r.digits]
        return cls(r.text, r.confidence, r.accepted, digits, REJECTIONS.get(r.rejection))


@dataclass(frozen=True)
class ReadReply:
    readings: list[Reading]
    model_name: str
    model_version: str


@dataclass(frozen=True)
class Failure:
    """One image that got no answer: the gRPC status name (or LOCAL for a file that could not be
    read here) and the message."""

    code: str
    message: str


# A request that fails for one bad image fails whole; its images are then sent one by one, so that
# the bad one is named and the others still get their answers.
PER_IMAGE_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


def to_image(image: ImageLike) -> digits_pb2.Image:
    """Encoded bytes or a 2-D pixel array -> protobuf Image."""
    if isinstance(image, bytes | bytearray | memoryview):
        return digits_pb2.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"pixel arrays must be 2-D [height, width], got shape {array.shape}")
    if array.dtype == np.uint8:
        dtype = digits_pb2.DTYPE_UINT8
    elif array.dtype == np.float32:
        dtype = digits_pb2.DTYPE_FLOAT32
        array = array.astype("<f4", copy=False)
    else:
        raise ValueError(f"pixel arrays must be uint8 or float32, got {array.dtype}")
    height, width = array.shape
    raw = digits_pb2.RawPixels(width=width, height=height, dtype=dtype, data=np.ascontiguousarray(array).tobytes())
    return digits_pb2.Image(raw=raw)


def read_token(path: Path) -> str:
    """The first token in a token file (one per line; blank lines and `#` comments skipped, as the server
    reads them). Raises ValueError naming the file, never the token."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read token file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    token = next((s for line in lines if (s := line.strip()) and not s.startswith("#")), None)
    if token is None:
        raise ValueError(f"token file {path} holds no token")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata that carries `token` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a channel (`grpc.intercept_channel`).

    Plain metadata rather than call credentials: gRPC sends call credentials only over TLS, and a token
    on a plaintext channel (inside a cluster, behind a TLS-terminating ingress) is a supported setup.
    """

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(token)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), *self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def _call(self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call


def channel(target: str, tls: TlsOptions | None = None, max_message_bytes: int = 64 * 1024 * 1024,
            token: str | None = None) -> grpc.Channel:
    """A blocking channel to `target` (host:port), plaintext or TLS, sending `token` on every call."""
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes),
                                         ("grpc.max_send_message_length", max_message_bytes)]
    if tls is None:
        ch = grpc.insecure_channel(target, options=options)
    else:
        ch = grpc.secure_channel(target, tls.credentials(), options=options + list(tls.options()))
    return grpc.intercept_channel(ch, BearerToken(token)) if token else ch


class DigitsClient:
    """Blocking client; use as a context manager or call `close()`. `token`: for --auth-token-file servers."""

    def __init__(self, target: str, tls: TlsOptions | None = None, timeout: float = 30.0,
                 token: str | None = None) -> None:
        self._channel = channel(target, tls, token=token)
        self._stub = digits_pb2_grpc.DigitRecognizerStub(self._channel)
        self._timeout = timeout

    def recognize(self, images: Sequence[ImageLike]) -> Reply:
        """Recognize images in one call; raises grpc.RpcError with the server's status and message."""
        request = digits_pb2.RecognizeRequest(images=[to_image(i) for i in images])
        response = self._stub.Recognize(request, timeout=self._timeout)
        return Reply(predictions=[Result.from_proto(p) for p in response.predictions],
                     model_name=response.model.name, model_version=response.model.version)

    def recognize_files(self, paths: Sequence[Path]) -> Reply:
        return self.recognize([Path(p).read_bytes() for p in paths])

    def read(self, images: Sequence[ImageLike]) -> ReadReply:
        """Read a line of digits in each image, in one call; raises grpc.RpcError like `recognize`."""
        request = digits_pb2.ReadRequest(images=[to_image(i) for i in images])
        response = self._stub.Read(request, timeout=self._timeout)
        return ReadReply(readings=[Reading.from_proto(r) for r in response.readings],
                         model_name=response.model.name, model_version=response.model.version)

    def read_stream(self, images: Iterable[ImageLike]) -> Iterator[tuple[int, Reading | Failure]]:
        """Read each image over one `ReadStream`, sending as the server takes them: yields (index in
        `images`, reading) as readings come back, in the order they are ready. A bad image yields a
        Failure and the stream goes on; a failure of the whole stream raises grpc.RpcError."""
        requests = (digits_pb2.StreamRequest(id=str(i), image=to_image(image)) for i, image in enumerate(images))
        for reply in self._stub.ReadStream(requests, timeout=self._timeout):
            if reply.WhichOneof("result") == "error":
                yield int(reply.id), Failure(reply.error.code, reply.error.message)
            else:
                yield int(reply.id), Reading.from_proto(reply.reading)

    def recognize_many(self, images: Sequence[ImageLike | Failure], batch: int = 64,
                       in_flight: int = 4) -> tuple[list[Result | Failure], str]:
        """`recognize` for any number of images: requests of at most `batch` images, `in_flight` at
        once, answers in input order. Never raises for one image: a bad one becomes a Failure (items
        given as a Failure, e.g. files that could not be read, stay one). Returns (outcomes, model)."""
        return self._many(images, batch, in_flight, lambda chunk: _pairs(self.recognize(chunk)))

    def read_many(self, images: Sequence[ImageLike | Failure], batch: int = 16,
                  in_flight: int = 4) -> tuple[list[Reading | Failure], str]:
        """`read` for any number of images, like `recognize_many`."""
        return self._many(images, batch, in_flight, lambda chunk: _pairs(self.read(chunk)))

    def _many(self, images: Sequence[ImageLike | Failure], batch: int, in_flight: int,
              call: Callable[[list[ImageLike]], tuple[list[T], str]]) -> tuple[list[T | Failure], str]:
        if batch < 1 or in_flight < 1:
            raise ValueError("batch and in_flight must be >= 1")
        outcomes: list[T | Failure] = [i if isinstance(i, Failure) else Failure("PENDING", "") for i in images]
        todo = [i for i, item in enumerate(images) if not isinstance(item, Failure)]
        chunks = [todo[start:start + batch] for start in range(0, len(todo), batch)]
        model = ""

        def send(indices: list[int]) -> list[tuple[int, T | Failure]]:
            nonlocal model
            try:
                answers, model = call([images[i] for i in indices])  # type: ignore[misc]
                return list(zip(indices, answers, strict=True))
            except grpc.RpcError as exc:
                failure = Failure(exc.code().name, str(exc.details()))
                if len(indices) > 1 and failure.code in PER_IMAGE_CODES:
                    return [pair for i in indices for pair in send([i])]
                return [(i, failure) for i in indices]

        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="digits-client") as pool:
            for done in pool.map(send, chunks):
                for index, outcome in done:
                    outcomes[index] = outcome
        return outcomes, model

    def health(self, service: str = "") -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of `service` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DigitsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _pairs(reply: Reply | ReadReply) -> tuple[list[Any], str]:
    answers: list[Any] = reply.predictions if isinstance(reply, Reply) else reply.readings
    return answers, f"{reply.model_name} {reply.model_version}"


def read_files(paths: Sequence[Path]) -> list[bytes | Failure]:
    """Each file's bytes, or a Failure naming why it could not be read (the others still go)."""
    out: list[bytes | Failure] = []
    for path in paths:
        try:
            out.append(Path(path).read_bytes())
        except OSError as exc:
            out.append(Failure("LOCAL", f"cannot read {path}: {exc.strerror or exc}"))
    return out
