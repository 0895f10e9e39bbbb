"""TLS and mutual TLS on the gRPC port, with throw-away certificates made by `cryptography`.

A TLS client that trusts the CA gets answers; a plaintext client, a client that does not trust the
server's CA, or one checking the wrong server name is refused. With --tls-client-ca, clients without a
certificate, or with one from another CA, are refused at the handshake. The CLI speaks TLS too, and
unusable TLS files stop the server at start-up with a message naming them. The HTTP port and (with
--metrics-tls) the metrics port: tests/server/test_https.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.client import DigitsClient, TlsOptions
from service.server.app import StartupError
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, render
from tests.pki import Pki, make_pki

DIGITS, _ = fixture_digits()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert=pki.server_cert, tls_key=pki.server_key) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca) as running:
        yield running


def recognize(target: str, tls: TlsOptions | None) -> int:
    with DigitsClient(target, tls=tls, timeout=10) as client:
        return client.recognize([DIGITS[0]]).predictions[0].digit


def refused(target: str, tls: TlsOptions | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        recognize(target, tls)
    return caught.value.code()


def test_tls_client_is_served_and_plaintext_or_untrusting_clients_are_refused(tls_server, pki) -> None:
    assert recognize(tls_server.target, TlsOptions(ca=pki.ca)) in range(10)
    assert refused(tls_server.target, None) == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not accept this server's certificate.
    assert refused(tls_server.target, TlsOptions(ca=pki.rogue_ca)) == grpc.StatusCode.UNAVAILABLE
    # The certificate names localhost and 127.0.0.1; checking for another name fails, as it should.
    assert refused(tls_server.target, TlsOptions(ca=pki.ca, server_name="digits.example.com")) == \
        grpc.StatusCode.UNAVAILABLE
    assert recognize(f"localhost:{tls_server.server.port}", TlsOptions(ca=pki.ca, server_name="localhost")) in range(10)
    with DigitsClient(tls_server.target, tls=TlsOptions(ca=pki.ca), timeout=10) as client:
        assert client.health() == "SERVING"


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(mtls_server, pki) -> None:
    assert refused(mtls_server.target, TlsOptions(ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert refused(mtls_server.target, TlsOptions(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)) == \
        grpc.StatusCode.UNAVAILABLE
    assert refused(mtls_server.target, None) == grpc.StatusCode.UNAVAILABLE
    assert recognize(mtls_server.target, TlsOptions(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) in range(10)
    # Refused handshakes never reach the service: only the one good call was counted.
    counted = mtls_server.server.metrics.requests.labels(rpc="Recognize", code="OK")._value.get()
    assert counted == 1


def test_client_certificate_and_key_go_together(pki) -> None:
    with pytest.raises(ValueError, match="together"):
        TlsOptions(ca=pki.ca, cert=pki.client_cert)
    with pytest.raises(ValueError, match="together"):
        TlsOptions(ca=pki.ca, key=pki.client_key)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_predict_and_health_speak_mutual_tls(mtls_server, pki, tmp_path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(render(DIGITS[0], 120, (200, 160), (40, 20)))
    server = ["--server", mtls_server.target]
    mtls = ["--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)]

    result = _cli("predict", *server, *mtls, "--json", str(image))
    assert result.returncode == 0, result.stderr
    assert '"digit"' in result.stdout

    result = _cli("health", *server, *mtls)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout

    result = _cli("health", *server, "--ca", str(pki.ca))  # TLS, but no client certificate
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr

    result = _cli("predict", *server, str(image))  # plaintext
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr

    result = _cli("predict", *server, "--ca", str(pki.ca), "--cert", str(pki.client_cert), str(image))
    assert result.returncode == 2
    assert "go together" in result.stderr and "Traceback" not in result.stderr


def _start(**overrides: Any) -> None:
    running = ServerThread(**overrides)
    try:
        running.start()
    finally:
        running.stop()


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize(("files", "message"), [
    (lambda p, tmp: {"tls_cert": tmp / "missing.pem", "tls_key": p.server_key}, "cannot read TLS files"),
    (lambda p, tmp: {"tls_cert": _garbage(tmp), "tls_key": p.server_key}, "are not a PEM certificate chain"),
    (lambda p, tmp: {"tls_cert": p.server_cert, "tls_key": p.client_key}, "matching unencrypted private key"),
    (lambda p, tmp: {"tls_cert": p.server_cert, "tls_key": p.server_key, "tls_client_ca": _garbage(tmp)},
     "holds no PEM CA certificate"),
], ids=["missing-cert", "garbage-cert", "key-mismatch", "garbage-client-ca"])
def test_unusable_tls_files_stop_start_up_with_a_clear_message(pki, tmp_path, files, message) -> None:
    with pytest.raises(StartupError, match=message) as caught:
        _start(**files(pki, tmp_path))
    assert "port already in use" not in str(caught.value)


def test_unusable_tls_files_through_the_cli(pki, tmp_path) -> None:
    result = _cli("serve", "--model", str(SHIPPED_MODEL), "--port", "0", "--metrics-port", "0",
                  "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    assert result.returncode == 1
    assert "matching unencrypted private key" in result.stderr and "Traceback" not in result.stderr
    result = _cli("serve", "--model", str(SHIPPED_MODEL), "--port", "0", "--tls-cert", str(pki.server_cert))
    assert result.returncode == 2
    assert "tls-cert and tls-key must be given together" in result.stderr
