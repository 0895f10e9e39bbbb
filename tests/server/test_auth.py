"""--auth-token-file on every protocol, each with a good, a missing and a wrong token, on a real server:

- gRPC DigitRecognizer (Recognize, RecognizeStream) and the Open Inference Protocol over gRPC (tritonclient.grpc);
- REST: v2 infer (tritonclient.http) and /v1/recognize (plain HTTP requests, as curl sends them);
- the CLI (predict, health, loadtest with --token-file) and the Python client.

Refusals are UNAUTHENTICATED / 401 (with `WWW-Authenticate: Bearer`), counted by protocol and reason, and never
reach a handler; health, readiness, reflection, the page's HTML and /metrics stay open. No token ever shows in a
log line or a metric. The file is re-read when it changes and on SIGHUP; a file that cannot be used is refused
at start-up, and on reload the tokens in force stay. The page's calls: tests/api/test_browser.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.client import DigitsClient, channel, to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from service.server.app import StartupError
from service.server.auth import Tokens
from service.telemetry.metrics import Metrics
from tests.harness import (
    SHIPPED_MODEL,
    ServerThread,
    fixture_digits,
    free_port,
    render,
    scrape,
    wait_serving,
    wait_until,
)

IMAGES, LABELS = fixture_digits()
PNG = render(IMAGES[0], 120, (160, 160), (20, 20))
# Tokens as operators make them (`openssl rand -base64 32`, `uuidgen`): base64 with padding, and a uuid.
GOOD = "q3Vb1m0xZ7cJ8uFh2YwTn5kLs9dR4eA6/pQ+oXiBCGM="
SECOND = "4f9a6c2e-8d31-4b7a-9e05-1c2d3e4f5a6b"
WRONG = "not-the-token-at-all"
TOKENS = (GOOD, SECOND, WRONG)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def token_file(path: Path, *tokens: str) -> Path:
    path.write_text("# accepted bearer tokens, one per line\n\n" + "\n".join(f"  {t}  " for t in tokens) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tokens = token_file(tmp_path_factory.mktemp("auth") / "tokens", GOOD, SECOND)
    with ServerThread(auth_token_file=tokens, http_port=free_port(), metrics_port=free_port()) as running:
        yield running


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def grpc_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


# --- gRPC: DigitRecognizer ---------------------------------------------------------------------------


def test_recognize_needs_an_accepted_token(server: ServerThread) -> None:
    for token in (GOOD, SECOND):
        with DigitsClient(server.target, token=token) as client:
            assert client.recognize([PNG]).predictions[0].digit == LABELS[0]
    for token in (None, WRONG):  # type: ignore[assignment]
        with DigitsClient(server.target, token=token) as client:
            assert grpc_code(lambda c=client: c.recognize([PNG])) == UNAUTHENTICATED
    stub = digits_pb2_grpc.DigitRecognizerStub(grpc.insecure_channel(server.target))
    request = digits_pb2.RecognizeRequest(images=[to_image(PNG)])
    for header in ("Basic Z29vZDp0b2tlbg==", "Bearer", f"Bearer {GOOD} extra"):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recognize(request, metadata=(("authorization", header),), timeout=10)
        assert caught.value.code() == UNAUTHENTICATED
        assert caught.value.details() == "the authorization header must be 'Bearer <token>'"


def test_recognize_stream_needs_an_accepted_token(server: ServerThread) -> None:
    def messages() -> Iterator[digits_pb2.StreamRequest]:
        for i in range(3):
            yield digits_pb2.StreamRequest(id=str(i), image=to_image(IMAGES[i]))

    with channel(server.target, token=GOOD) as good:
        replies = list(digits_pb2_grpc.DigitRecognizerStub(good).RecognizeStream(messages(), timeout=30))
        assert sorted(r.prediction.digit for r in replies) == sorted(LABELS[:3])
    for token in (None, WRONG):
        with channel(server.target, token=token) as ch:
            stub = digits_pb2_grpc.DigitRecognizerStub(ch)
            assert grpc_code(lambda s=stub: list(s.RecognizeStream(messages(), timeout=30))) == UNAUTHENTICATED


# --- gRPC: the Open Inference Protocol ---------------------------------------------------------------


def v2_input(module, count: int = 4):
    pixels = IMAGES[:count].reshape(count, 1, 28, 28)
    tensor = module.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def test_v2_grpc_infer_and_metadata_need_a_token_and_readiness_does_not(server: ServerThread) -> None:
    client = triton_grpc.InferenceServerClient(server.target)
    result = client.infer("lenet5", [v2_input(triton_grpc)], headers=bearer(GOOD))
    assert list(result.as_numpy("probabilities").argmax(axis=1)) == list(LABELS[:4])
    assert client.get_model_metadata("lenet5", headers=bearer(SECOND)).name == "lenet5"
    for token in (None, WRONG):
        for call in (lambda t=token: client.infer("lenet5", [v2_input(triton_grpc)], headers=bearer(t)),
                     lambda t=token: client.get_model_metadata("lenet5", headers=bearer(t)),
                     lambda t=token: client.get_server_metadata(headers=bearer(t))):
            with pytest.raises(InferenceServerException) as caught:
                call()
            assert caught.value.status() == str(UNAUTHENTICATED)
    # Liveness and readiness are for probes: no token.
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lenet5")


def test_health_and_reflection_stay_open(server: ServerThread) -> None:
    ch = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "digits.v1.DigitRecognizer" in names
    ch.close()


# --- REST ----------------------------------------------------------------------------------------------


def rest(server: ServerThread, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_v1_recognize_needs_an_accepted_token(server: ServerThread) -> None:
    png = {"Content-Type": "image/png"}
    status, _, body = rest(server, "POST", "/v1/recognize", PNG, {**png, "Authorization": f"Bearer {GOOD}"})
    assert status == 200 and json.loads(body)["digit"] == LABELS[0]
    status, headers, body = rest(server, "POST", "/v1/recognize", PNG, png)
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="digits"'
    assert json.loads(body) == {"code": "UNAUTHENTICATED",
                                "error": "this server requires a bearer token: send 'authorization: Bearer <token>'"}
    status, headers, body = rest(server, "POST", "/v1/recognize", PNG, {**png, "Authorization": f"Bearer {WRONG}"})
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="digits", error="invalid_token"'
    assert json.loads(body)["error"] == "the bearer token is not accepted"
    status, _, _ = rest(server, "POST", "/v1/recognize", PNG, {**png, "Authorization": f"Basic {GOOD}"})
    assert status == 401


@pytest.fixture(scope="module")
def rest_client(server: ServerThread) -> Iterator[triton_http.InferenceServerClient]:
    # Module-scoped and closed here, on the main thread: tritonclient.http's gevent pool must not be
    # collected (and closed again) from another thread.
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    yield client
    client.close()


def test_v2_rest_infer_and_metadata_need_a_token(server: ServerThread,
                                                 rest_client: triton_http.InferenceServerClient) -> None:
    client = rest_client
    result = client.infer("lenet5", [v2_input(triton_http)], headers=bearer(GOOD))
    assert list(result.as_numpy("probabilities").argmax(axis=1)) == list(LABELS[:4])
    assert client.get_model_metadata("lenet5", headers=bearer(GOOD))["name"] == "lenet5"
    for token in (None, WRONG):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("lenet5", [v2_input(triton_http)], headers=bearer(token))
        assert caught.value.status() == "401"
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/lenet5"), ("POST", "/v2/models/unknown/infer"),
                             ("GET", "/v2/models/lenet5/versions/1.0.0")):
            assert rest(server, method, path, headers=bearer(token))[0] == 401, path
        # Not a route at all: the same 404 / 405 as without authentication (a browser's favicon probe).
        assert rest(server, "GET", "/favicon.ico", headers=bearer(token))[0] == 404
        assert rest(server, "GET", "/v1/recognize", headers=bearer(token))[0] == 405


def test_page_health_and_readiness_stay_open_over_rest(server: ServerThread) -> None:
    version = server.recognizer.model.version
    for path in ("/", "/v2/health/live", "/v2/health/ready", "/v2/models/lenet5/ready",
                 f"/v2/models/lenet5/versions/{version}/ready"):
        assert rest(server, "GET", path)[0] == 200, path
    assert rest(server, "HEAD", "/v2/health/ready")[0] == 200


# --- counting, and what never shows -----------------------------------------------------------------


def test_refusals_are_counted_by_protocol_and_reason_and_tokens_never_show(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = token_file(tmp_path / "tokens", GOOD)
    with caplog.at_level(logging.DEBUG), \
            ServerThread(auth_token_file=tokens, http_port=free_port(), metrics_port=free_port()) as running:
        for token in (GOOD, None, WRONG, WRONG):
            with DigitsClient(running.target, token=token) as client, contextlib.suppress(grpc.RpcError):
                client.recognize([PNG])
        for header in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": f"Token {GOOD}"},
                       {"Authorization": f"Bearer {GOOD}"}):
            rest(running, "POST", "/v1/recognize", PNG, {"Content-Type": "image/png", **header})
        metrics = scrape(running.server.metrics_port)
    refusals = {(labels["protocol"], labels["reason"]): value
                for labels, value in metrics.samples["digits_auth_refusals_total"]}
    assert refusals == {("grpc", "missing"): 1, ("grpc", "wrong"): 2, ("grpc", "malformed"): 0,
                        ("http", "missing"): 1, ("http", "wrong"): 1, ("http", "malformed"): 1}
    assert metrics.value("digits_auth_tokens") == 1
    # Refused calls never reached a handler: only the two good ones were answered.
    assert metrics.value("digits_requests_total", rpc="Recognize", code="OK") == 1
    assert metrics.value("digits_requests_total", rpc="POST /v1/recognize", code="OK") == 1
    assert sum(v for _, v in metrics.samples["digits_requests_total"]) == 2
    lines = [r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records]
    assert sum("request refused: unauthenticated" in line for line in lines) == 6
    for token in TOKENS:
        assert not any(token in line for line in lines), token
        assert token not in metrics.text


# --- the token file ----------------------------------------------------------------------------------


def test_a_changed_file_is_picked_up_and_a_broken_one_keeps_the_tokens_in_force(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = token_file(tmp_path / "tokens", GOOD)
    with ServerThread(auth_token_file=path, watch_interval_s=0.05) as running:
        def accepted(token: str) -> bool:
            with DigitsClient(running.target, token=token) as client:
                try:
                    client.recognize([IMAGES[0]])
                    return True
                except grpc.RpcError as exc:
                    assert exc.code() == UNAUTHENTICATED
                    return False

        assert accepted(GOOD) and not accepted(SECOND)
        # Rotation, the way a Kubernetes Secret update lands: a new file renamed over the old one.
        os.replace(token_file(tmp_path / "new", SECOND), path)
        wait_until(lambda: accepted(SECOND), timeout=30, what="the new token file to be read")
        assert not accepted(GOOD)
        # A file emptied (or garbled) by mistake locks nobody out: the tokens in force stay.
        os.replace(token_file(tmp_path / "broken", "not a token!"), path)
        metrics = running.server.metrics
        wait_until(lambda: metrics.auth_token_reloads.labels(result="failed")._value.get() == 1, timeout=30,
                   what="the broken token file to be refused")
        assert accepted(SECOND) and not accepted(GOOD)
        assert metrics.auth_token_reloads.labels(result="success")._value.get() == 1
    refused = [r.getMessage() for r in caplog.records if "token file reload refused" in r.getMessage()]
    assert refused == [f"token file reload refused, keeping the 1 tokens in force: --auth-token-file {path}: "
                       "line 3 is not a bearer token (letters, digits and -._~+/ then optional '=' padding; "
                       "one token per line)"]


@pytest.mark.parametrize(("content", "message"), [
    (None, r"cannot read it \(No such file or directory\)"),
    ("# only a comment\n\n", "holds no token: every call would be refused"),
    (f"{GOOD}\nsecret with spaces\n", "line 2 is not a bearer token"),
], ids=["missing", "empty", "bad-line"])
def test_an_unusable_token_file_stops_the_start_up(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "tokens"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StartupError, match=message) as caught:
        ServerThread(auth_token_file=path).start()
    assert str(path) in str(caught.value) and "secret" not in str(caught.value)
    if content is not None:
        result = _cli("serve", "--model", str(SHIPPED_MODEL), "--port", "0", "--metrics-port", "0",
                      "--auth-token-file", str(path))
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert "secret" not in result.stderr


def test_tokens_are_compared_whole(tmp_path: Path) -> None:
    tokens = Tokens(token_file(tmp_path / "tokens", GOOD), Metrics(process_collectors=False))
    assert tokens.check(f"Bearer {GOOD}") is None
    assert tokens.check(f"bearer   {GOOD}") is None  # the scheme is case-insensitive (RFC 7235)
    for near in (GOOD[:-1], "A" + GOOD, GOOD.lower(), GOOD.replace("/", "_")):
        assert tokens.check(f"Bearer {near}") == "wrong", near
    for header in ("Bearer", "Bearer ", GOOD, f"Basic {GOOD}", f"Bearer {GOOD}, Bearer {GOOD}"):
        assert tokens.check(header) == "malformed", header
    assert tokens.check(None) == "missing" and tokens.check("") == "missing"
    assert Metrics(process_collectors=False).auth_tokens._value.get() == 0  # authentication off: 0 tokens


# --- the CLI, with a real `digits serve` ---------------------------------------------------------------


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`digits serve --auth-token-file` as a subprocess (the file polled only hourly: SIGHUP must do it)."""
    path = token_file(tmp_path_factory.mktemp("served") / "tokens", GOOD)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(SHIPPED_MODEL),
                             "--port", str(port), "--metrics-port", "0", "--threads", "1",
                             "--auth-token-file", str(path), "--watch-interval-s", "3600"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        yield proc, f"127.0.0.1:{port}", path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_cli_clients_send_the_token_file(served, tmp_path: Path) -> None:
    _, target, _ = served
    image = tmp_path / "digit.png"
    image.write_bytes(PNG)
    good, wrong = token_file(tmp_path / "good", GOOD), token_file(tmp_path / "wrong", WRONG)
    result = _cli("predict", "--server", target, "--token-file", str(good), "--json", str(image))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["digit"] == LABELS[0]
    for flags in ([], ["--token-file", str(wrong)]):
        result = _cli("predict", "--server", target, *flags, str(image))
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr and "Traceback" not in result.stderr
        assert WRONG not in result.stderr
    for flags in ([], ["--token-file", str(good)]):  # health is open; the flag is accepted all the same
        assert _cli("health", "--server", target, *flags).returncode == 0
    load = ["loadtest", "--server", target, "--requests", "20", "--warmup", "0", "--concurrency", "2", "--quiet",
            "--json"]
    result = _cli(*load, "--token-file", str(good))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] == 20
    result = _cli(*load, "--token-file", str(wrong))
    assert result.returncode == 1 and json.loads(result.stdout)["errors"] == {"UNAUTHENTICATED": 20}
    result = _cli("predict", "--server", target, "--token-file", str(tmp_path / "missing"), str(image))
    assert result.returncode == 2 and "cannot read token file" in result.stderr


def test_sighup_rereads_the_token_file(served, tmp_path: Path) -> None:
    proc, target, path = served
    os.replace(token_file(tmp_path / "rotated", SECOND), path)

    def accepted(token: str) -> bool:
        with DigitsClient(target, token=token) as client:
            try:
                return client.recognize([IMAGES[0]]).predictions[0].digit >= 0
            except grpc.RpcError:
                return False

    assert accepted(GOOD)  # polled hourly: not seen yet
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: accepted(SECOND), timeout=30, what="SIGHUP to re-read the token file")
    assert not accepted(GOOD)
