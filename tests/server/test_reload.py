"""Hot model reload: in-process, by SIGHUP to a real `digits serve`, and by --watch.

Version 2 of the model is the shipped model with its logits halved (temperature 2): the same digits
win, but every probability differs measurably, so each reply can be checked against the version it
names. While clients keep sending real digits, the model is swapped back and forth: no request may
fail, and every reply's probabilities must be those of the version it names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from service.client import DigitsClient, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.recognition.model import ModelLoadError
from service.recognition.model_metadata import ModelMetadata
from service.recognition.preprocess import normalize
from tests.harness import (
    SHIPPED_MODEL,
    ServerThread,
    build_model,
    fixture_digits,
    free_port,
    shipped_metadata,
    wait_serving,
    wait_until,
)

IMAGES, _ = fixture_digits()
DIGITS = IMAGES[:64]
# Server batch vs. in-process single run: float32 kernels differ slightly with the batch size. Relative,
# because a confident model's small probabilities (1e-12) are where two versions differ most.
MATCH_RTOL, MATCH_ATOL = 1e-3, 1e-9
V1 = "1-reload-test"
V2 = "2-reload-test"


def make_version(source: Path, out: Path, version: str, logit_scale: float = 1.0) -> Path:
    """A copy of `source` with `model_version` set, its logits multiplied by `logit_scale`."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    props["model_version"] = version
    helper.set_model_props(model, props)
    if logit_scale != 1.0:
        logits = ModelMetadata.from_props(props).output_names[0]
        index, producer = next((i, n) for i, n in enumerate(model.graph.node) if logits in n.output)
        producer.output[list(producer.output).index(logits)] = "logits_unscaled"
        model.graph.initializer.append(numpy_helper.from_array(np.array(logit_scale, dtype=np.float32), "logit_scale"))
        model.graph.node.insert(index + 1, helper.make_node("Mul", ["logits_unscaled", "logit_scale"], [logits]))
    onnx.save(model, str(out))
    return out


def reference_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    return session.run(["probabilities"], {meta.input_name: normalize(images, meta.normalization)})[0]


@dataclass
class Versions:
    v1: Path
    v2: Path
    expected: dict[str, np.ndarray]  # version -> probabilities of DIGITS

    def check(self, version: str, indexes: list[int], probabilities: np.ndarray) -> None:
        """The reply's probabilities are those of the version it names (and not the other's)."""
        assert version in self.expected, f"reply names unknown model version {version!r}"
        np.testing.assert_allclose(probabilities, self.expected[version][indexes], rtol=MATCH_RTOL,
                                   atol=MATCH_ATOL, err_msg=f"probabilities are not those of version {version}")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    directory = tmp_path_factory.mktemp("versions")
    v1 = make_version(SHIPPED_MODEL, directory / "v1.onnx", V1)
    v2 = make_version(SHIPPED_MODEL, directory / "v2.onnx", V2, logit_scale=0.5)
    expected = {V1: reference_probabilities(v1, DIGITS), V2: reference_probabilities(v2, DIGITS)}
    # The check above can only tell the versions apart if, for every digit, they differ by far more
    # than its tolerance.
    difference = np.abs(expected[V1] - expected[V2]) / (MATCH_ATOL + MATCH_RTOL * np.abs(expected[V1]))
    assert difference.max(axis=1).min() > 20
    return Versions(v1, v2, expected)


@dataclass
class Traffic:
    """Clients sending real digits in a loop until stopped; every reply and failure is recorded."""

    target: str
    versions: Versions
    stop: threading.Event = field(default_factory=threading.Event)
    replies: dict[str, int] = field(default_factory=lambda: {V1: 0, V2: 0})
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def _record(self, version: str, indexes: list[int], probabilities: np.ndarray) -> None:
        try:
            self.versions.check(version, indexes, probabilities)
        except AssertionError as exc:
            with self.lock:
                self.failures.append(f"wrong model answered: {exc}")
            return
        with self.lock:
            self.replies[version] += 1

    def _unary(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(self.target) as channel:
            stub = digits_pb2_grpc.DigitRecognizerStub(channel)
            while not self.stop.is_set():
                indexes = rng.choice(len(DIGITS), size=int(rng.integers(1, 9)), replace=False).tolist()
                request = digits_pb2.RecognizeRequest(images=[to_image(DIGITS[i]) for i in indexes])
                try:
                    reply = stub.Recognize(request, timeout=30)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failures.append(f"{exc.code().name}: {exc.details()}")
                    continue
                probabilities = np.array([list(p.probabilities) for p in reply.predictions], dtype=np.float32)
                self._record(reply.model.version, indexes, probabilities)

    def _stream(self) -> None:
        def messages() -> Iterator[digits_pb2.StreamRequest]:
            i = 0
            while not self.stop.is_set():
                yield digits_pb2.StreamRequest(id=str(i % len(DIGITS)), image=to_image(DIGITS[i % len(DIGITS)]))
                i += 1

        with grpc.insecure_channel(self.target) as channel:
            stub = digits_pb2_grpc.DigitRecognizerStub(channel)
            try:
                for reply in stub.RecognizeStream(messages(), timeout=120):
                    if reply.HasField("error"):
                        with self.lock:
                            self.failures.append(f"stream {reply.error.code}: {reply.error.message}")
                        continue
                    self._record(reply.model.version, [int(reply.id)],
                                 np.array([list(reply.prediction.probabilities)], dtype=np.float32))
            except grpc.RpcError as exc:
                with self.lock:
                    self.failures.append(f"stream {exc.code().name}: {exc.details()}")

    def start(self, unary_clients: int = 3) -> Traffic:
        self.threads = [threading.Thread(target=self._unary, args=(seed,)) for seed in range(unary_clients)]
        self.threads.append(threading.Thread(target=self._stream))
        for thread in self.threads:
            thread.start()
        return self

    def total(self) -> int:
        with self.lock:
            return sum(self.replies.values())

    def count(self, version: str) -> int:
        with self.lock:
            return self.replies[version]

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_reload_under_concurrent_load_loses_nothing(versions, tmp_path) -> None:
    served = shutil.copy(versions.v1, tmp_path / "model.onnx")
    with ServerThread(model=Path(served), metrics_port=free_port(), max_batch_delay_ms=1.0) as running:
        recognizer = running.server.recognizer
        assert recognizer is not None
        traffic = Traffic(running.target, versions).start()
        try:
            reloads = 6
            for n in range(reloads):
                path, version = (versions.v2, V2) if n % 2 == 0 else (versions.v1, V1)
                wanted = traffic.count(version) + 20
                running.call(recognizer.reload(path))
                # Keep each version in service until it has answered some requests.
                wait_until(lambda: traffic.count(version) >= wanted, timeout=30,  # noqa: B023 (called at once)
                           what=f"replies from {version}")
        finally:
            traffic.finish()
        metrics = scrape(running.server.metrics_port)
    assert traffic.failures == []
    assert traffic.count(V1) >= 60 and traffic.count(V2) >= 60
    print(f"\nreload: {reloads} swaps under 3 unary clients + 1 stream: {traffic.total()} replies "
          f"({traffic.count(V1)} from v1, {traffic.count(V2)} from v2), 0 failed, every one matching its version")
    assert f'version="{V1}"' in metrics and f'version="{V2}"' not in metrics  # the last swap was back to v1
    assert f'digits_model_reloads_total{{result="success"}} {float(reloads)}' in metrics


def _serve(model: Path, port: int, metrics_port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--model", str(model), "--port", str(port),
         "--metrics-port", str(metrics_port), "--threads", "1", "--log-format", "json", *extra],
        stderr=subprocess.PIPE, text=True)


def test_sighup_reloads_the_replaced_file_and_refuses_a_broken_one(versions, tmp_path) -> None:
    served = Path(shutil.copy(versions.v1, tmp_path / "model.onnx"))
    port, metrics_port = free_port(), free_port()
    proc = _serve(served, port, metrics_port)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
        traffic = Traffic(target, versions).start(unary_clients=2)
        try:
            wait_until(lambda: traffic.count(V1) >= 20, timeout=30, what="replies from v1")
            staged = Path(shutil.copy(versions.v2, tmp_path / "model.onnx.new"))
            os.replace(staged, served)  # what a deploy does: the old inode stays valid for readers
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: traffic.count(V2) >= 20, timeout=30, what="replies from v2 after SIGHUP")

            (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not a model")
            os.replace(tmp_path / "broken.onnx", served)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: 'digits_model_reloads_total{result="failed"} 1.0' in scrape(metrics_port),
                       timeout=30, what="the failed reload to be counted")
            after_broken = traffic.count(V2)
            wait_until(lambda: traffic.count(V2) >= after_broken + 20, timeout=30, what="v2 still serving")
        finally:
            traffic.finish()
        metrics = scrape(metrics_port)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert traffic.failures == []
    assert traffic.count(V1) >= 20 and traffic.count(V2) >= 40
    assert f'version="{V2}"' in metrics and f'version="{V1}"' not in metrics
    assert 'digits_model_reloads_total{result="success"} 1.0' in metrics
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    refused = [r["message"] for r in logged if "model reload refused" in r["message"]]
    assert len(refused) == 1 and f"still serving lenet5 {V2}" in refused[0] and "not a valid ONNX model" in refused[0]
    assert proc.returncode == 0


def test_watch_reloads_when_the_file_changes(versions, tmp_path) -> None:
    served = Path(shutil.copy(versions.v1, tmp_path / "model.onnx"))
    with ServerThread(model=served, watch=True, watch_interval_s=0.05) as running:
        recognizer = running.server.recognizer
        assert recognizer is not None
        traffic = Traffic(running.target, versions).start(unary_clients=2)
        try:
            wait_until(lambda: traffic.count(V1) >= 20, timeout=30, what="replies from v1")
            os.replace(shutil.copy(versions.v2, tmp_path / "staged.onnx"), served)
            wait_until(lambda: recognizer.model.version == V2, timeout=30, what="--watch to load v2")
            before = traffic.count(V2)
            wait_until(lambda: traffic.count(V2) >= before + 20, timeout=30, what="replies from v2")

            # An incompatible model (other ink polarity) written in place is refused; v2 keeps serving.
            failed = running.server.metrics.model_reloads.labels(result="failed")
            build_model(served, metadata=shipped_metadata(model_version="3-incompatible", ink_polarity="dark_on_light"))
            wait_until(lambda: failed._value.get() == 1, timeout=30, what="the incompatible model to be refused")
            before = traffic.count(V2)
            wait_until(lambda: traffic.count(V2) >= before + 20, timeout=30, what="v2 still serving")
        finally:
            traffic.finish()
    assert traffic.failures == []
    assert recognizer.model.version == V2


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"garbage") and p, "not a valid ONNX model"),
    (lambda p: build_model(p, input_shape=("N", 3, 32, 32)), "must be float32 [N, 1, 28, 28]"),
    (lambda p: build_model(p, metadata={k: v for k, v in shipped_metadata().items() if k != "normalization"}),
     "missing normalization"),
    (lambda p: build_model(p, fixed_reshape=True), "while running Reshape node"),
    (lambda p: build_model(p, metadata=shipped_metadata(ink_polarity="dark_on_light")), "is incompatible"),
], ids=["corrupt", "wrong-signature", "no-normalization", "fails-on-a-batch", "other-ink-polarity"])
def test_a_bad_new_model_is_refused_and_the_old_one_keeps_serving(versions, tmp_path, caplog, make, message) -> None:
    bad = make(tmp_path / "bad.onnx")
    with ServerThread(model=versions.v1) as running:
        recognizer = running.server.recognizer
        assert recognizer is not None
        with (caplog.at_level(logging.ERROR, logger="service.recognition.recognizer"),
              pytest.raises(ModelLoadError, match=re.escape(message))):
            running.call(recognizer.reload(bad))
        with grpc.insecure_channel(running.target) as channel:
            reply = digits_pb2_grpc.DigitRecognizerStub(channel).Recognize(
                digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])]), timeout=10)
        assert reply.model.version == V1
        assert running.server.metrics.model_reloads.labels(result="failed")._value.get() == 1
    lines = [r.getMessage() for r in caplog.records if "model reload refused" in r.getMessage()]
    assert len(lines) == 1 and f"still serving lenet5 {V1}" in lines[0] and message in lines[0]


def test_watch_follows_a_kubernetes_configmap_swap(versions, tmp_path) -> None:
    """A ConfigMap volume as the kubelet writes it: the model is `lenet5.onnx -> ..data/lenet5.onnx`,
    `..data` a symlink to a timestamped directory; an update writes a new directory and renames a new
    `..data` link over the old one (one atomic step), then deletes the old directory. A real `digits serve
    --watch` must follow it to the new model and keep answering throughout."""
    mount = tmp_path / "config"
    first = mount / "..2026_12_01_10_00_00.000000001"
    first.mkdir(parents=True)
    shutil.copy(versions.v1, first / "lenet5.onnx")
    (mount / "..data").symlink_to(first.name)
    (mount / "lenet5.onnx").symlink_to("..data/lenet5.onnx")
    port = free_port()
    proc = _serve(mount / "lenet5.onnx", port, 0, "--watch", "--watch-interval-s", "0.1")
    try:
        wait_serving(f"127.0.0.1:{port}")
        with DigitsClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.recognize([DIGITS[0]]).model_version == V1
            second = mount / "..2026_12_01_10_05_00.000000002"
            second.mkdir()
            shutil.copy(versions.v2, second / "lenet5.onnx")
            (mount / "..data_tmp").symlink_to(second.name)
            os.replace(mount / "..data_tmp", mount / "..data")
            shutil.rmtree(first)
            wait_until(lambda: client.recognize([DIGITS[0]]).model_version == V2, timeout=30,
                       what="--watch to follow the ConfigMap swap to v2")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]
    assert "model reloaded" in stderr
