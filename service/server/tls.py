"""TLS for every port the server opens, from one set of files: --tls-cert, --tls-key, --tls-client-ca.

- gRPC: gRPC's own TLS (`grpc_credentials`); a plaintext client fails the handshake.
- HTTP/REST and the page: an `ssl.SSLContext` for aiohttp (`server_context`); plain HTTP on that port
  fails the handshake too, so nothing is ever served unencrypted next to a TLS gRPC port.
- /metrics, only with --metrics-tls (the same `server_context`): Prometheus usually scrapes pods over
  plain HTTP inside the cluster, so the metrics port stays plaintext unless asked.

With --tls-client-ca every one of them requires a client certificate signed by that CA (mutual TLS).
Unusable files stop the start-up with a message naming them (gRPC itself would only say "Failed to bind").
"""

from __future__ import annotations

import logging
import ssl

import grpc

from service.server.config import ServerConfig

log = logging.getLogger(__name__)


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
