"""The real container images: built by deploy/image/build.sh (podman or docker; it makes the Python base with
debootstrap where Docker Hub is out of reach) and run.

The CPU server image (the Dockerfile's default target) must:
- report healthy through its own HEALTHCHECK command (`podman healthcheck run`; `docker exec` of the
  HEALTHCHECK's CMD with docker);
- predict real digits over gRPC (DigitRecognizer and the Open Inference Protocol) and REST;
- run as uid 10001 on a read-only root filesystem with only the in-memory /tmp the manifests give it;
- drain on SIGTERM: a stream that is open when the signal comes is still served, then the process exits 0;
- hold no torch, no compiler and no pip (its size is reported).
The training image (`--target train`) trains on the fixture digits and writes a model the server loads.

Each container runs with the host's network on free 127.0.0.1 ports. Without podman or docker the module skips,
except under CI=true, where it fails (`make test` installs podman, runc and debootstrap there). Build, start,
drain and training times and the image sizes are printed in the run's "measured" summary.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from service.client import DigitsClient, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.model import load_model
from service.recognition.preprocess import normalize
from tests.harness import FIXTURE_DIR, fixture_digits, free_port, render, scrape, wait_until

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "image" / "build.sh"
SERVER_TAG = "localhost/digits:test"
TRAIN_TAG = "localhost/digits-train:test"
TORCH_INDEX_PORT = 47613  # the local torch index's port where download.pytorch.org is out of reach
TRAIN_ARGS = ("--epochs", "15", "--no-augment", "--lr-schedule", "constant", "--val-size", "100")
IMAGES, LABELS = fixture_digits()
# A fresh build downloads the server's wheels (tens of MB); the training image, torch (200 MB).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@dataclass(frozen=True)
class Engine:
    """How this machine runs containers, as deploy/image/build.sh chose it."""

    command: tuple[str, ...]  # the engine and its global flags
    create: tuple[str, ...]  # flags `run` needs here (ulimits)

    @property
    def podman(self) -> bool:
        return Path(self.command[0]).name == "podman"

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(args[:3])}: {result.stderr[-3000:]}"
        return result


@pytest.fixture(scope="module")
def engine() -> Engine:
    found = subprocess.run([str(BUILD), "engine"], capture_output=True, text=True, timeout=120)
    if found.returncode == 3:
        message = f"no container engine: {found.stderr.strip()}"
        if in_ci():
            pytest.fail(f"{message} (CI must build and run the image: `make test` installs podman)")
        pytest.skip(message)
    assert found.returncode == 0, found.stderr
    command, create = [*found.stdout.splitlines(), ""][:2]
    return Engine(tuple(command.split()), tuple(create.split()))


def build(engine: Engine, measured: Any, target: str, tag: str, extra: str = "") -> float:
    """deploy/image/build.sh as `make image` runs it; returns the image size in MB."""
    env = {**os.environ, "EXTRA_BUILD_ARGS": extra}
    started = time.monotonic()
    result = subprocess.run([str(BUILD), "build", "--target", target, "--tag", tag], capture_output=True,
                            text=True, timeout=1500, env=env)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    size = int(engine("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6
    base = re.search(r"base: (made \S+ in \d+ s|reusing \S+|PYTHON_IMAGE=\S+)", result.stderr)
    measured(f"image {tag} (--target {target}): built in {seconds:.0f} s ({base[1] if base else 'base ?'}), "
             f"{size:.0f} MB")
    return size


@pytest.fixture(scope="module")
def server_image(engine: Engine, measured: Any) -> str:
    build(engine, measured, "runtime", SERVER_TAG)
    return SERVER_TAG


@dataclass
class Container:
    name: str
    grpc_port: int
    http_port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def read_only_flags(engine: Engine) -> list[str]:
    """The manifests' filesystem: a read-only root and a small in-memory /tmp, nothing else writable."""
    flags = ["--read-only", "--tmpfs", "/tmp:rw,size=64m,mode=1777", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges"]
    if engine.podman:
        # podman would add writable tmpfs mounts of its own on /run, /var/tmp and /tmp otherwise; and its
        # HEALTHCHECK timer needs systemd, which some hosts lack: the test runs the check itself.
        flags += ["--read-only-tmpfs=false", "--health-interval", "disable"]
    return flags


@pytest.fixture(scope="module")
def container(engine: Engine, server_image: str, measured: Any) -> Iterator[Container]:
    running = Container(f"digits-test-{os.getpid()}", free_port(), free_port(), free_port())
    engine("rm", "--force", running.name, check=False)
    env = {"DIGITS_HOST": "127.0.0.1", "DIGITS_PORT": running.grpc_port, "DIGITS_HTTP_PORT": running.http_port,
           "DIGITS_METRICS_PORT": running.metrics_port, "DIGITS_THREADS": 1}
    started = time.monotonic()
    engine("run", "--detach", "--name", running.name, "--network", "host", *engine.create, *read_only_flags(engine),
           *[f"--env={k}={v}" for k, v in env.items()], server_image)
    try:
        wait_until(lambda: healthcheck(engine, running.name), timeout=90, what="the image's HEALTHCHECK to pass")
        measured(f"image {server_image}: HEALTHCHECK passing {time.monotonic() - started:.1f} s after `run`")
        yield running
    finally:
        engine("rm", "--force", running.name, check=False)


def healthcheck(engine: Engine, name: str) -> bool:
    """The image's own HEALTHCHECK command, run the way the engine runs it."""
    state = engine("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
    if state not in ("running", "created", "configured"):
        raise AssertionError(f"container {state}: {engine('logs', name, check=False).stderr[-3000:]}")
    if engine.podman:
        return engine("healthcheck", "run", name, check=False, timeout=30).returncode == 0
    test = json.loads(engine("inspect", "--format", "{{json .Config.Healthcheck.Test}}", name).stdout)
    assert test[0] == "CMD", test
    return engine("exec", name, *test[1:], check=False, timeout=30).returncode == 0


def test_the_healthcheck_is_the_images_and_asks_the_grpc_health_service(engine: Engine, container: Container,
                                                                       server_image: str) -> None:
    # Kept in the image: the build wrote the Docker format (OCI images have no HEALTHCHECK).
    check = json.loads(engine("image", "inspect", "--format", "{{json .Config.Healthcheck}}", server_image).stdout)
    assert check and "digits health --server" in " ".join(check["Test"]), check
    assert healthcheck(engine, container.name)
    with DigitsClient(container.target, timeout=10) as client:
        assert client.health("digits.v1.DigitRecognizer") == "SERVING"


def test_real_digits_are_predicted_over_grpc_and_rest(container: Container) -> None:
    count = 64  # one full batch: no waiting for company
    with DigitsClient(container.target, timeout=30) as client:
        reply = client.recognize([render(IMAGES[i], 120, (160, 160), (20, 20)) for i in range(count)])
    accuracy = float(np.mean(np.array([p.digit for p in reply.predictions]) == LABELS[:count]))
    assert accuracy >= 0.9, f"{accuracy:.0%} of {count} real digits right from the image"
    v2 = triton.InferenceServerClient(container.target)
    pixels = IMAGES[:8].reshape(8, 1, 28, 28)
    tensor = triton.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    probabilities = v2.infer("lenet5", [tensor]).as_numpy("probabilities")
    assert np.mean(probabilities.argmax(axis=1) == LABELS[:8]) >= 0.75
    png = render(IMAGES[0], 120, (160, 160), (20, 20))
    request = urllib.request.Request(f"http://127.0.0.1:{container.http_port}/v1/recognize", png,
                                     {"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["digit"] == LABELS[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{container.http_port}/v2/health/ready", timeout=10) as ready:
        assert ready.status == 200
    metrics = scrape(container.metrics_port)
    assert metrics.value("digits_requests_total", rpc="Recognize", code="OK") == 1
    assert metrics.value("digits_images_received_total", rpc="Recognize") == count
    assert metrics.by("digits_model_info", "provider") == {"CPUExecutionProvider": 1.0}


def exec_(engine: Engine, container: Container, *command: str) -> subprocess.CompletedProcess[str]:
    return engine("exec", container.name, *command, check=False, timeout=60)


def test_runs_as_uid_10001_on_a_read_only_root_with_an_in_memory_tmp(engine: Engine, container: Container) -> None:
    status = exec_(engine, container, "cat", "/proc/1/status").stdout  # PID 1 is `digits serve` itself
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
    assert re.search(r"^Gid:\s+10001\s", status, re.M)
    assert re.search(r"^CapEff:\s+0+$", status, re.M)  # --cap-drop ALL, as the manifests do
    assert exec_(engine, container, "sh", "-c", "exec id -u").stdout.strip() == "10001"
    for path in ("/opt/digits/probe", "/opt/venv/probe", "/probe", "/models/probe"):
        denied = exec_(engine, container, "touch", path)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    assert exec_(engine, container, "touch", "/tmp/probe").returncode == 0
    mounts = exec_(engine, container, "cat", "/proc/mounts").stdout
    assert re.search(r"^\S+ / \S+ ro[,\s]", mounts, re.M), mounts
    assert re.search(r"^tmpfs /tmp tmpfs rw", mounts, re.M), mounts
    writable = [line.split()[1] for line in mounts.splitlines()
                if " rw" in f" {line.split()[3]}" and line.split()[2] not in ("proc", "sysfs", "cgroup", "cgroup2",
                                                                             "devpts", "mqueue")
                and line.split()[1] not in ("/dev", "/dev/shm", "/tmp")
                and not line.split()[1].startswith(("/etc/", "/run/.containerenv", "/dev/", "/sys", "/proc"))]
    assert not writable, f"writable mounts besides /tmp: {writable}"


def test_no_torch_no_compiler_no_pip(engine: Engine, container: Container, server_image: str, measured: Any) -> None:
    probe = ("import importlib.util as u, importlib.metadata as m; "
             "print(u.find_spec('torch'), u.find_spec('pip'), sorted(d.metadata['Name'].lower() for d in "
             "m.distributions()))")
    found = exec_(engine, container, "python", "-c", probe)
    assert found.returncode == 0, found.stderr
    torch, pip, dists = found.stdout.split(" ", 2)
    assert torch == "None" and pip == "None", found.stdout
    assert "onnxruntime" in dists and "torch" not in dists and "onnxruntime-gpu" not in dists
    compilers = exec_(engine, container, "sh", "-c",
                      "for c in cc gcc c++ g++ clang clang++ tcc cpp ld as make; do command -v $c; done; true")
    assert compilers.stdout.strip() == "", compilers.stdout
    packages = exec_(engine, container, "dpkg-query", "--show", "--showformat", "${Package}\\n").stdout.split()
    assert not [p for p in packages if re.fullmatch(r"(gcc|g\+\+|cpp|clang|binutils|make|build-essential|"
                                                    r"libc6-dev|python3.*-dev)(-\d+)?", p)], packages
    train = exec_(engine, container, "digits", "train", "--data-dir", "/nowhere", "--out-dir", "/tmp/nowhere")
    assert train.returncode == 2 and "training extra" in train.stderr  # it knows it cannot train
    size = int(engine("image", "inspect", "--format", "{{.Size}}", server_image).stdout.strip()) / 1e6
    assert size < 600, f"{size:.0f} MB"  # 374 MB measured; near 600 means something heavy crept in
    measured(f"image {server_image}: {size:.0f} MB, {len(dists.split(','))} Python distributions, "
             f"{len(packages)} Debian packages")


def test_sigterm_drains_a_stream_in_flight_then_exits_0(engine: Engine, container: Container,
                                                        measured: Any) -> None:
    """Last: it stops the container. A stream open when SIGTERM arrives is still answered; then exit 0."""
    requests: queue.Queue[digits_pb2.StreamRequest | None] = queue.Queue()

    def messages() -> Iterator[digits_pb2.StreamRequest]:
        while (message := requests.get()) is not None:
            yield message

    channel = grpc.insecure_channel(container.target)
    replies = digits_pb2_grpc.DigitRecognizerStub(channel).RecognizeStream(messages(), timeout=60)
    requests.put(digits_pb2.StreamRequest(id="before", image=to_image(IMAGES[0])))
    assert next(replies).prediction.digit == LABELS[0]
    with ThreadPoolExecutor(1) as pool:
        signalled = time.monotonic()
        stop = pool.submit(engine, "stop", "--time", "30", container.name, timeout=60)  # STOPSIGNAL SIGTERM
        wait_until(lambda: "shutdown signal received; draining" in logs(engine, container), timeout=30,
                   what="the drain to start")
        # Draining: a new caller is refused (or told NOT_SERVING), the open stream is still served.
        wait_until(lambda: not serving(container), timeout=30, what="new calls to be refused")
        requests.put(digits_pb2.StreamRequest(id="during", image=to_image(IMAGES[1])))
        during = next(replies)
        assert during.id == "during" and during.prediction.digit == LABELS[1]
        requests.put(None)  # the client ends its stream: nothing is left in flight
        assert list(replies) == []
        stop.result()
    drained = time.monotonic() - signalled
    channel.close()
    exit_code = engine("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    assert exit_code == "0", logs(engine, container)
    assert '"message": "stopped"' in logs(engine, container)
    assert drained < 10, f"{drained:.1f} s: the stop waited for the kill timeout instead of the drain"
    measured(f"image: SIGTERM with a stream in flight -> stream answered, exit 0 after {drained:.2f} s")


def serving(container: Container) -> bool:
    try:
        with DigitsClient(container.target, timeout=2) as fresh:
            return fresh.health() == "SERVING"
    except grpc.RpcError:
        return False


def logs(engine: Engine, container: Container) -> str:
    result = engine("logs", container.name, check=False)
    return result.stdout + result.stderr


# --- the training image --------------------------------------------------------------------------------


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """EXTRA_BUILD_ARGS for the train stage's torch: PyTorch's CPU index where it resolves; elsewhere a local
    index (on 127.0.0.1, which the build reaches with --network host) of the CPU wheel and its dependencies,
    as this machine's pip finds them (here: a local wheel cache in front of the package registry)."""
    if _resolves("download.pytorch.org"):
        yield ""
        return
    wheels = tmp_path_factory.mktemp("torch-wheels")
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin, "constraints.txt pins torch"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels),
                              "--only-binary", ":all:", f"torch=={pin[1]}"], capture_output=True, text=True,
                             timeout=900)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    torch = [w.name for w in wheels.glob("torch-*.whl")]
    if not any("+cpu" in name for name in torch):
        message = f"no CPU torch wheel reachable ({torch}; download.pytorch.org does not resolve)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    simple = wheels / "simple"
    for wheel in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (simple / project).mkdir(parents=True, exist_ok=True)
        with (simple / project / "index.html").open("a") as page:
            page.write(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(wheels))
    try:
        # The same URL every run where the port is free: the build argument is part of the layer cache's key,
        # so a new port would reinstall torch on every run.
        server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"--build-arg TORCH_INDEX_URL=http://127.0.0.1:{server.server_port}/simple"
    finally:
        server.shutdown()


def test_the_training_image_trains_on_the_fixture_and_writes_a_model(
        engine: Engine, torch_index: str, tmp_path: Path, measured: Any) -> None:
    size = build(engine, measured, "train", TRAIN_TAG, extra=torch_index)
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o777)  # the job runs as 10001
    started = time.monotonic()
    # /runs is a VOLUME of the image: an anonymous volume, owned by the job's user, removed with the container.
    flags = [*engine.create, *read_only_flags(engine), "--volume", f"{FIXTURE_DIR}:/data:ro",
             "--volume", f"{models}:/models:rw"]
    result = engine("run", "--rm", "--network", "host", *flags, TRAIN_TAG, "--data-dir", "/data",
                    "--out-dir", "/runs/latest", "--model-out", "/models/lenet5.onnx", *TRAIN_ARGS,
                    "--version", "0.0.1-image-test", timeout=900, check=False)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = load_model(models / "lenet5.onnx", "cpu", 1, 8)  # as a server loads what the job publishes
    assert model.version == "0.0.1-image-test" and (models / "lenet5.json").is_file()
    _, probabilities = model.run(normalize(IMAGES, model.metadata.normalization))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == LABELS))
    assert accuracy > 0.7, f"{accuracy:.0%} on the fixture's 300 held-out digits ({' '.join(TRAIN_ARGS)})"
    # Its negatives were printed in the training fonts, as `make train` prints them, not in Pillow's own
    # font, which rejection is measured on.
    fonts = json.loads((models / "lenet5.json").read_text())["rejection"]["negatives"]["fonts"]
    assert "DejaVuSans, " in fonts and "DejaVuSerif" in fonts and "pillow-builtin" not in fonts, fonts
    measured(f"image {TRAIN_TAG}: {size:.0f} MB; {' '.join(TRAIN_ARGS)} on the fixture's 400 training digits + "
             f"export in {seconds:.0f} s (container start included), {accuracy:.1%} on its 300 held-out digits")
