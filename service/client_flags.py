"""Connection flags shared by every client subcommand (predict, health, loadtest, bench): TLS and the
bearer token. A subcommand that calls `add_tls_client_flags` gets `--token-file` as well; it passes
`token_from_args(args)` to its client.

Imported on every `digits` invocation, so it imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_tls_client_flags(parser: argparse.ArgumentParser) -> None:
    """Add --tls, --ca, --cert, --key and --server-name to a client subcommand."""
    group = parser.add_argument_group("TLS (when the server uses --tls-cert)")
    group.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca)")
    group.add_argument("--ca", type=Path, help="PEM CA that signed the server certificate (default: system roots)")
    group.add_argument("--cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument("--key", type=Path, help="PEM client key (mutual TLS)")
    group.add_argument("--server-name", help="name to verify in the server certificate (default: from --server)")
    auth = parser.add_argument_group("authentication (when the server uses --auth-token-file)")
    auth.add_argument("--token-file", type=Path, metavar="FILE",
                      help="send the first token in FILE as 'authorization: Bearer <token>' on every call")


def tls_from_args(args: argparse.Namespace) -> Any:
    """TlsOptions from the client flags, or None for plaintext; ValueError names a bad flag."""
    from service.client import TlsOptions

    if not (args.tls or args.ca or args.cert or args.key):
        return None
    for flag, path in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return TlsOptions(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def token_from_args(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file, or None; ValueError names the file (never the token)."""
    from service.client import read_token

    path = getattr(args, "token_file", None)
    return read_token(path) if path is not None else None
