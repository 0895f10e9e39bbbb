"""Test helpers shared by the server tests: a real server on an ephemeral port in a background
thread, real fixture digits, and digits rendered the way clients send them."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from service.benchprocs import free_port as free_port  # re-exported: the tests take it from here
from service.config import ServerConfig
from service.server import DigitsServer

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
