"""HTTPS (and mutual TLS) on the REST port and the page, and --metrics-tls, from the same --tls-cert/--tls-key/
--tls-client-ca as the gRPC port, on real servers with throw-away certificates (tests/pki.py).

Curl-like clients that trust the CA are served; plain HTTP on the TLS port is refused and never reaches a
handler; with --tls-client-ca a client without a certificate from the CA is refused. The metrics port stays
plain HTTP unless --metrics-tls, and then one idle connection cannot hold it. The page over HTTPS in
Chromium: tests/api/test_browser.py.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from service.server.app import StartupError
from service.server.config import ServerConfig
from tests.harness import Scrape, ServerThread, fixture_digits, free_port, render, scrape
from tests.pki import Pki, make_pki

DIGITS, LABELS = fixture_digits()
PNG = render(DIGITS[0], 120, (160, 160), (20, 20))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_server(pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert=pki.server_cert, tls_key=pki.server_key, http_port=free_port(),
                      metrics_port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
                      http_port=free_port(), metrics_port=free_port(), metrics_tls=True) as running:
        yield running


def client_context(pki: Pki, cert: bool = False) -> ssl.SSLContext:
    """What curl --cacert ca.pem [--cert client.pem --key client.key] does: verify the server, maybe present one."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def https(port: int, method: str, path: str, context: ssl.SSLContext | None, body: bytes | None = None,
          headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request over HTTPS (or plain HTTP when `context` is None)."""
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=10)
    else:
        connection = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answered(server: ServerThread) -> float:
    """Every request the server counted, any route, any code."""
    return sum(sample.value for family in server.server.metrics.registry.collect() if family.name == "digits_requests"
               for sample in family.samples if sample.name == "digits_requests_total")


def test_https_serves_the_api_and_the_page_to_clients_that_trust_the_ca(https_server: ServerThread, pki: Pki) -> None:
    port = https_server.server.http_port
    context = client_context(pki)
    assert https(port, "GET", "/v2/health/ready", context)[0] == 200
    status, body = https(port, "POST", "/v1/recognize", context, PNG, {"Content-Type": "image/png"})
    assert status == 200 and json.loads(body)["digit"] == LABELS[0]
    status, body = https(port, "GET", "/", context, host="localhost")  # the certificate names both
    assert status == 200 and b"<canvas" in body
    # A client that trusts another CA does not accept the server's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        https(port, "GET", "/v2/health/ready", ssl.create_default_context(cafile=str(pki.rogue_ca)))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_over_https(https_server: ServerThread, pki: Pki, tmp_path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(PNG)
    url = f"https://localhost:{https_server.server.http_port}/v1/recognize"
    result = subprocess.run(["curl", "-sS", "--fail", "--cacert", str(pki.ca), "-F", f"image=@{image}", url],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["digit"] == LABELS[0]
    insecure = subprocess.run(["curl", "-sS", url.replace("https://", "http://")], capture_output=True, text=True,
                              timeout=30)
    assert insecure.returncode != 0  # curl: the server closed the connection on a plaintext request


def test_plain_http_on_the_tls_port_is_refused_before_any_handler(https_server: ServerThread) -> None:
    before = answered(https_server)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        https(https_server.server.http_port, "POST", "/v1/recognize", None, PNG, {"Content-Type": "image/png"})
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        https(https_server.server.http_port, "GET", "/v2/health/ready", None)
    assert answered(https_server) == before


def test_metrics_stay_plain_http_by_default(https_server: ServerThread) -> None:
    assert scrape(https_server.server.metrics_port).value("digits_auth_tokens") == 0


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    port = mtls_server.server.http_port
    before = answered(mtls_server)
    # TLS 1.3 reports the missing certificate after the handshake, on the first read.
    for context in (client_context(pki), ssl.create_default_context(cafile=str(pki.ca))):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https(port, "POST", "/v1/recognize", context, PNG, {"Content-Type": "image/png"})
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(str(pki.rogue_cert), str(pki.rogue_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(port, "GET", "/v2/health/ready", rogue)
    assert answered(mtls_server) == before
    status, body = https(port, "POST", "/v1/recognize", client_context(pki, cert=True), PNG,
                         {"Content-Type": "image/png"})
    assert status == 200 and json.loads(body)["digit"] == LABELS[0]


def test_metrics_tls_needs_the_client_certificate_and_survives_an_idle_connection(
        mtls_server: ServerThread, pki: Pki) -> None:
    port = mtls_server.server.metrics_port
    url = f"https://127.0.0.1:{port}/metrics"
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(url.replace("https", "http"), timeout=5).read()
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(url, timeout=5, context=client_context(pki)).read()
    # A connection that never starts its handshake must not hold the port for the scraper.
    with socket.create_connection(("127.0.0.1", port), timeout=5), \
            urllib.request.urlopen(url, timeout=5, context=client_context(pki, cert=True)) as page:
        metrics = Scrape(page.read().decode())
    assert "digits_build_info" in metrics.names


def test_metrics_tls_needs_the_tls_files() -> None:
    with pytest.raises(ValueError, match="metrics-tls needs tls-cert and tls-key"):
        ServerConfig(metrics_tls=True)


def test_unusable_tls_files_stop_start_up_before_any_port_opens(pki: Pki, tmp_path) -> None:
    port = free_port()
    with pytest.raises(StartupError, match="cannot read TLS files: --tls-key"):
        ServerThread(tls_cert=pki.server_cert, tls_key=tmp_path / "missing.key", http_port=port).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # still free: nothing was bound
