"""MLServer 1.7.1 as a peer: the same model, served by the server users compare us with first.

MLServer cannot share this project's virtual environment (it needs protobuf < 7 and tritonclient >=
2.42; our stubs need protobuf 7 and tritonclient 2.41 is the last to allow it), so `make peer` installs
it into its own, runs/mlserver-venv; `find_mlserver` looks there, then on PATH. `MLServerProcess`
writes a model folder (settings.json, model-settings.json and `mlserver_runtime.py`, an onnxruntime
runtime), starts `mlserver start` on free ports and waits until the model is ready over gRPC.

Its settings are its best on this 2-core machine: adaptive batching off (max_batch_size 0), inference
in the server process (parallel_workers 0: no IPC to a worker), 1 onnxruntime thread, no metrics
endpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from service.gen.inference import grpc_predict_v2_pb2 as pb
from service.gen.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.perf.benchprocs import free_port, process_tree_cpu_s, stop_process

VERSION = "1.7.1"
VENV = Path("runs/mlserver-venv")
INSTALL_HINT = (f"`make peer` installs MLServer {VERSION} into {VENV} (it cannot share .venv: it needs "
                "protobuf < 7 and tritonclient >= 2.42)")


class PeerUnavailable(RuntimeError):
    """The peer cannot be measured here; the message says why."""


def find_mlserver(explicit: Path | None = None) -> Path:
    """The `mlserver` executable: `explicit`, else runs/mlserver-venv's, else one on PATH."""
    for candidate in ([explicit] if explicit else [VENV / "bin" / "mlserver", Path(shutil.which("mlserver") or "")]):
        if candidate and candidate.is_file():
            return candidate
    raise PeerUnavailable(f"MLServer is not installed: {INSTALL_HINT}" if explicit is None
                          else f"no MLServer at {explicit}")


class MLServerProcess:
    """`mlserver start` serving `model` as `name` over gRPC on a free 127.0.0.1 port; a context manager."""

    def __init__(self, model: Path, name: str = "lenet5", threads: int = 1, executable: Path | None = None,
                 startup_s: float = 120.0) -> None:
        self._executable = find_mlserver(executable).absolute()
        self._model = model.resolve()
        self._name = name
        self._threads = threads
        self._startup_s = startup_s
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_folder(self, folder: Path) -> None:
        shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), folder / "mlserver_runtime.py")
        (folder / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "grpc_port": self.port, "http_port": free_port(),
            "metrics_endpoint": None, "metrics_port": free_port(), "parallel_workers": 0,
            "load_models_at_startup": True}))
        (folder / "model-settings.json").write_text(json.dumps({
            "name": self._name, "implementation": "mlserver_runtime.OnnxDigits", "max_batch_size": 0,
            "max_batch_time": 0, "parameters": {"uri": str(self._model), "version": "1",
                                                 "extra": {"threads": self._threads}}}))

    def __enter__(self) -> MLServerProcess:
        self._folder = tempfile.TemporaryDirectory(prefix="mlserver-peer-")
        folder = Path(self._folder.name)
        self._write_folder(folder)
        self._log = (folder / "mlserver.log").open("w+")
        self.process = subprocess.Popen([str(self._executable), "start", str(folder)], cwd=folder,
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self._startup_s
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.process.poll() is not None:
                    tail = self._tail()
                    self.__exit__()
                    raise PeerUnavailable(f"mlserver exited with {self.process.returncode}: {tail}")
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=self._name), timeout=1.0).ready:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    tail = self._tail()
                    self.__exit__()
                    raise PeerUnavailable(f"mlserver not ready after {self._startup_s:g} s: {tail}")
                time.sleep(0.1)

    def cpu_s(self) -> float | None:
        return None if self.process is None else process_tree_cpu_s(self.process.pid)

    def _tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return " ".join(self._log.read()[-600:].split())

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process(self.process, 20)
        self._log.close()
        self._folder.cleanup()
