"""TLS for every port the server opens, from one set of files: --tls-cert, --tls-key, --tls-client-ca.

- gRPC: gRPC's own TLS (`grpc_credentials`); a plaintext client fails the handshake.
- HTTP/REST and the page: an `ssl.SSLContext` for aiohttp (`server_context`); plain HTTP on that port
  fails the handshake too, so nothing is ever served unencrypted next to a TLS gRPC port.
- /metrics, only with --metrics-tls (`start_metrics_https`): Prometheus usually scrapes pods over plain
  HTTP inside the cluster, so the metrics port stays plaintext unless asked.

With --tls-client-ca every one of them requires a client certificate signed by that CA (mutual TLS).
Unusable files stop the start-up with a message naming them (gRPC itself would only say "Failed to bind").
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, make_wsgi_app

from service.server.config import ServerConfig

log = logging.getLogger(__name__)

# A client that opens a TLS connection to /metrics and then says nothing must not hold the port: the
# handshake runs on the connection's own thread, bounded by this.
HANDSHAKE_TIMEOUT_S = 10.0


class TlsFilesError(RuntimeError):
    """The TLS files cannot be used; the message names them and says why."""


def server_context(cfg: ServerConfig) -> ssl.SSLContext:
    """The server side of TLS (and mutual TLS with --tls-client-ca) for the HTTP port, checking the files.

    Raises TlsFilesError naming the file that cannot be used.
    """
    files = (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key), ("--tls-client-ca", cfg.tls_client_ca))
    for flag, path in files:
        if path is not None:
            try:
                path.read_bytes()
            except OSError as exc:
                raise TlsFilesError(f"cannot read TLS files: {flag} {path}: {exc.strerror or exc}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # The password callback makes an encrypted key fail here instead of prompting on the terminal;
        # gRPC cannot use encrypted keys either.
        context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key), password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFilesError(
            f"--tls-cert {cfg.tls_cert} and --tls-key {cfg.tls_key} are not a PEM certificate chain and its "
            f"matching unencrypted private key ({exc})") from exc
    if cfg.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(cfg.tls_client_ca))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsFilesError(f"--tls-client-ca {cfg.tls_client_ca} holds no PEM CA certificate ({exc})") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def grpc_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    """gRPC's server credentials from the same files (checked by `server_context` first)."""
    server_context(cfg)
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    client_ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (prometheus_client's own server does the same)."""


class _HttpsServer(WSGIServer):
    """prometheus_client's threading WSGI server, with TLS that never stalls the accept loop.

    `ssl.SSLContext.wrap_socket` on the listening socket would run each handshake inside accept(), on the
    one thread that accepts every scrape; here each accepted connection is wrapped and shaken hands with
    on its own thread, under a timeout.
    """

    daemon_threads = True
    context: ssl.SSLContext

    def process_request(self, request: Any, client_address: Any) -> None:
        threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True).start()

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            tls = self.context.wrap_socket(request, server_side=True)
            tls.settimeout(None)
            self.finish_request(tls, client_address)
            self.shutdown_request(tls)
        except (OSError, ValueError) as exc:  # plaintext, no client certificate, timeouts, resets
            log.debug("metrics TLS connection from %s failed: %s", client_address, exc)
            self.shutdown_request(request)


def start_metrics_https(cfg: ServerConfig, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` at https://host:metrics_port/metrics (any path, like prometheus_client); returns the
    server, whose `server_port` is the bound port and whose `shutdown()` stops it."""
    server = make_server(cfg.host, cfg.metrics_port, make_wsgi_app(registry), _HttpsServer,
                         handler_class=_QuietHandler)
    assert isinstance(server, _HttpsServer)
    server.context = server_context(cfg)
    threading.Thread(target=server.serve_forever, name="metrics-https", daemon=True).start()
    return server
