"""Test helpers shared by the server tests: a real server on an ephemeral port in a background
thread, real fixture digits, and digits rendered the way clients send them."""

from __future__ import annotations

import asyncio
import collections
import http.client
import io
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.perf.benchprocs import free_port as free_port  # re-exported: the tests take it from here
from service.recognition.recognizer import Recognizer
from service.server.app import DigitsServer
from service.server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "models" / "lenet5.onnx"
# 500 train + 300 t10k real MNIST digits (see tests/fixtures/make_mnist_small.py).
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "mnist-small"

T = TypeVar("T")


def fixture_digits(split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits committed under tests/fixtures: (images [N,28,28] uint8, labels [N])."""
    from training.data import read_images, read_labels

    return (read_images(FIXTURE_DIR / f"{split}-images-idx3-ubyte.gz"),
            read_labels(FIXTURE_DIR / f"{split}-labels-idx1-ubyte.gz"))


def render(digit: np.ndarray, size: int, canvas: tuple[int, int], offset: tuple[int, int],
           fmt: str = "PNG", rgba: bool = False) -> bytes:
    """A 28x28 MNIST digit as a client would send it: black ink on white (or on transparent with
    `rgba`), scaled to `size` pixels, at `offset` on a `canvas` (width, height), encoded as `fmt`."""
    ink = Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR)
    if rgba:
        page = Image.new("RGBA", canvas, (255, 255, 255, 0))
        black = Image.new("RGBA", (size, size), (0, 0, 0, 255))
        page.paste(black, offset, mask=ink)
    else:
        page = Image.new("L", canvas, 255)
        page.paste(Image.eval(ink, lambda v: 255 - v), offset)
        if fmt == "JPEG":
            page = page.convert("RGB")
    out = io.BytesIO()
    page.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until true; fails the test after `timeout` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class ServerThread:
    """A real DigitsServer on 127.0.0.1 with an ephemeral gRPC port, in its own event-loop thread."""

    def __init__(self, config: ServerConfig | None = None, available_providers: list[str] | None = None,
                 **overrides: Any) -> None:
        base = config or ServerConfig(model=SHIPPED_MODEL, host="127.0.0.1", port=0, metrics_port=0, threads=1)
        self.config = base.replace(**overrides) if overrides else base
        self.server = DigitsServer(self.config, available_providers=available_providers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._stopped = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def recognizer(self) -> Recognizer:
        """The running server's Recognizer (there is one once started)."""
        assert self.server.recognizer is not None, "the server is not started"
        return self.server.recognizer

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        try:
            self.call(self.server.start())
        except BaseException:
            self._stopped = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            raise
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        if not self._stopped:
            self._stopped = True
            try:
                self.call(self.server.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_serving(target: str) -> bool:
    """True when the server at `target` answers its gRPC health check with SERVING."""
    import grpc

    from service.client import DigitsClient

    try:
        with DigitsClient(target, timeout=2) as client:
            return client.health() == "SERVING"
    except grpc.RpcError:
        return False


def wait_serving(target: str, timeout: float = 60.0) -> None:
    """Wait for a server started as a subprocess to report SERVING (fails the test after `timeout`)."""
    wait_until(lambda: is_serving(target), timeout=timeout, what=f"{target} SERVING")


# --- models built for a test: a valid signature and metadata, or one fault at a time ---


def shipped_metadata(**changes: str) -> dict[str, str]:
    """The shipped model's metadata_props (valid by construction), with `changes` applied."""
    props = {p.key: p.value for p in onnx.load(str(SHIPPED_MODEL), load_external_data=False).metadata_props}
    props.update(changes)
    return props


def build_model(path: Path, *, input_name: str = "image", input_shape: Sequence[int | str] = ("N", 1, 28, 28),
                output_names: tuple[str, str] = ("logits", "probabilities"), fixed_reshape: bool = False,
                metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A linear digit "model" (flatten, matmul, softmax) with the given signature.

    `fixed_reshape` flattens to [1, features]: the graph loads and runs for one image but fails on
    a batch, which only the warm-up can discover.
    """
    features = int(np.prod([d for d in input_shape[1:] if isinstance(d, int)]))
    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(0, 0.05, (features, 10)).astype(np.float32), "weights")
    bias = numpy_helper.from_array(np.zeros(10, dtype=np.float32), "bias")
    initializers = [weights, bias]
    if fixed_reshape:
        initializers.append(numpy_helper.from_array(np.array([1, features], dtype=np.int64), "flat_shape"))
        flatten = helper.make_node("Reshape", [input_name, "flat_shape"], ["flat"])
    else:
        flatten = helper.make_node("Flatten", [input_name], ["flat"], axis=1)
    nodes = [
        flatten,
        helper.make_node("MatMul", ["flat", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], [output_names[0]]),
        helper.make_node("Softmax", [output_names[0]], [output_names[1]], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "digits-test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 10]) for name in output_names],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata if metadata is not None else shipped_metadata())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- /metrics as Prometheus reads it ---


class Scrape:
    """One GET of /metrics, parsed: sample name -> [(labels, value)], and each family's type."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append((dict(sample.labels), sample.value))

    @property
    def names(self) -> set[str]:
        """Every sample name exported (histograms as their _bucket, _sum and _count series)."""
        return set(self.samples)

    def value(self, name: str, **labels: str) -> float:
        """The one sample of `name` with exactly these labels (0 when the series does not exist)."""
        found = [v for lab, v in self.samples.get(name, []) if lab == labels]
        assert len(found) <= 1, f"{name}{labels} exported {len(found)} times"
        return found[0] if found else 0.0

    def by(self, name: str, label: str) -> dict[str, float]:
        """`name`'s non-zero series keyed by one label's value."""
        return {lab[label]: v for lab, v in self.samples.get(name, []) if v}

    def total(self, name: str) -> float:
        return sum(v for _, v in self.samples.get(name, []))


def scrape(port: int) -> Scrape:
    """GET http://127.0.0.1:`port`/metrics as Prometheus would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return Scrape(response.read().decode())


# --- plain HTTP, as curl sends it ---


def request(url: str, method: str, path: str, body: bytes | Iterator[bytes] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (http.client: bytes on the wire as curl would send them)."""
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def multipart(field: str, filename: str | None, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n").encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
