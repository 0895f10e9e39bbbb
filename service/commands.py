"""The serving subcommands of `digits`: serve, predict, health."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.client_flags import add_tls_client_flags, tls_from_args, token_from_args
from service.server import config as config_module

Subparsers = Any  # argparse's _SubParsersAction is private


def register_serve(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over gRPC with dynamic batching and Prometheus metrics",
        description="Serve an ONNX digit model. Every flag can also be set with a DIGITS_* environment "
                    "variable (flag > environment > default).")
    config_module.add_arguments(parser)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from service.server.app import serve
    from service.telemetry import logs

    try:
        cfg = config_module.from_sources(args)
    except ValueError as exc:
        print(f"digits serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_format, cfg.log_level)
    if cfg.workers > 1:
        from service.server.workers import run_workers

        return run_workers(cfg)
    return asyncio.run(serve(cfg))


def register_predict(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="recognize image files with a running server",
        description="Send image files (PNG, JPEG, ...) to a server; prints `file digit confidence` per file.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files")
    parser.add_argument("--server", default="localhost:50051", help="host:port of the server")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of text lines")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    add_tls_client_flags(parser)
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import grpc

    from service.client import DigitsClient

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"digits predict: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        tls, token = tls_from_args(args), token_from_args(args)
    except ValueError as exc:
        print(f"digits predict: {exc}", file=sys.stderr)
        return 2
    try:
        with DigitsClient(args.server, tls=tls, timeout=args.timeout, token=token) as client:
            reply = client.recognize_files(args.files)
    except grpc.RpcError as exc:
        print(f"digits predict: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    rows = [{"file": str(f), "digit": p.digit, "confidence": round(p.confidence, 6),
             "probabilities": [round(v, 6) for v in p.probabilities],
             "model": reply.model_name, "model_version": reply.model_version}
            for f, p in zip(args.files, reply.predictions, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['file']}\t{row['digit']}\t{row['confidence']:.4f}")
    return 0


def register_health(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "health", help="check a server's gRPC health (exit 0 only when SERVING)",
        description="Ask grpc.health.v1 for the server's status; exit 0 when SERVING, 1 otherwise "
                    "(used by the Docker HEALTHCHECK).")
    parser.add_argument("--server", default="localhost:50051", help="host:port of the server")
    parser.add_argument("--service", default="", help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    add_tls_client_flags(parser)
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace) -> int:
    import grpc

    from service.client import DigitsClient

    try:
        tls, token = tls_from_args(args), token_from_args(args)
    except ValueError as exc:
        print(f"digits health: {exc}", file=sys.stderr)
        return 2
    try:
        with DigitsClient(args.server, tls=tls, timeout=args.timeout, token=token) as client:
            status = client.health(args.service)
    except grpc.RpcError as exc:
        print(f"{args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


def register_performance(subparsers: Subparsers) -> None:
    """`digits loadtest` and `digits bench` (service/perf/commands.py)."""
    from service.perf.commands import register_bench, register_loadtest

    register_loadtest(subparsers)
    register_bench(subparsers)


REGISTRARS: list[Callable[[Subparsers], None]] = [register_serve, register_predict, register_health,
                                                   register_performance]
