"""The processes `digits bench` measures: `digits serve` subprocesses on free 127.0.0.1 ports, the
trivial grpc.aio servicer for the bare round trip (`python -m service.perf.benchprocs echo`), and their CPU
time from /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

ECHO_METHOD = "/bench.Echo/Echo"
ECHO_REPLY = bytes(64)  # about the size of a one-image RecognizeResponse


def process_tree_cpu_s(pid: int) -> float | None:
    """utime + stime of `pid` and all its descendants (live ones), in seconds; None off Linux."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            rest = text[text.rindex(")") + 2:].split()
            stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    except (OSError, ValueError, AttributeError):
        return None
    if pid not in stats:
        return None
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += stats[current][1]
        frontier += [p for p, (parent, _) in stats.items() if parent == current]
    return total


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`digits serve` in a subprocess on a free 127.0.0.1 port; a context manager."""

    def __init__(self, model: Path, threads: int, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (lives as long as the server)
        self._args = [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                      "--port", str(self.port), "--metrics-port", "0", "--threads", str(threads),
                      "--log-level", "warning", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self._args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 120
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}: {self._tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"server not SERVING after 120 s: {self._tail()}")
                time.sleep(0.05)

    def cpu_s(self) -> float | None:
        return None if self.process is None else process_tree_cpu_s(self.process.pid)

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:]

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


class EchoServer:
    """The trivial grpc.aio servicer (bytes in, 64 bytes out) in its own process: the bare round trip."""

    def __enter__(self) -> EchoServer:
        self.process = subprocess.Popen([sys.executable, "-m", "service.perf.benchprocs", "echo"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError(f"echo server did not start (said {line!r})")
        self.target = f"127.0.0.1:{line}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return ECHO_REPLY


async def _serve_echo() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: Sequence[str]) -> int:
    """`python -m service.perf.benchprocs echo`: the trivial servicer used for the bare round trip."""
    if list(argv) != ["echo"]:
        print("usage: python -m service.perf.benchprocs echo", file=sys.stderr)
        return 2
    asyncio.run(_serve_echo())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
