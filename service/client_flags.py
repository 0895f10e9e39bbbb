"""Connection flags shared by every client subcommand (predict, health, loadtest, bench).

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


def tls_from_args(args: argparse.Namespace) -> Any:
    """TlsOptions from the client flags, or None for plaintext; ValueError names a bad flag."""
    from service.client import TlsOptions

    if not (args.tls or args.ca or args.cert or args.key):
        return None
    for flag, path in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return TlsOptions(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
