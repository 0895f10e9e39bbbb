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


def stop_process(process: subprocess.Popen[bytes] | subprocess.Popen[str], wait_s: float) -> None:
    """SIGTERM, `wait_s` seconds to exit, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class PortProcess:
    """`python -m MODULE ARGS...` that prints the port it listens on as its first line and serves on
    127.0.0.1 until SIGTERM; a context manager with `target` and `cpu_s`."""

    def __init__(self, what: str, *module_args: str) -> None:
        self._what = what
        self._args = module_args

    def __enter__(self) -> PortProcess:
        self.process = subprocess.Popen([sys.executable, "-m", *self._args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError(f"{self._what} did not start (said {line!r})")
        self.target = f"127.0.0.1:{line}"
        return self

    def cpu_s(self) -> float | None:
        return process_tree_cpu_s(self.process.pid)

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process, 10)


# Ports free_port has handed out in this process. Once its probe socket is closed, the kernel may give
# the same port to the very next probe, so a server's gRPC, HTTP and metrics ports, asked for one
# after the other, could all be one port (seen in CI: "address already in use" on the second bind).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0), and
    never one this process was given before."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


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
        if self.process is not None:
            stop_process(self.process, 30)
        self._log.close()


class EchoServer(PortProcess):
    """The trivial grpc.aio servicer (bytes in, 64 bytes out) in its own process: the bare round trip."""

    def __init__(self) -> None:
        super().__init__("echo server", "service.perf.benchprocs", "echo")


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
