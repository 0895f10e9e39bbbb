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
        description="Send image files (PNG, JPEG, ...) to a server, any number of them (in requests of "
                    "--batch, --in-flight at once); prints `file<TAB>digit<TAB>confidence<TAB>verdict` per "
                    "file, in file order. The verdict is `accepted`, or why not: no_ink, not_a_digit, "
                    "uncertain. A file that cannot be read or is refused is named on stderr and the others "
                    "are still answered; the exit status is then 1.")
    _add_file_client_flags(parser, batch=64)
    parser.set_defaults(func=run_predict)


def register_read(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "read", help="read numbers (a line of digits per image) with a running server",
        description="Send image files that each hold one line of digits (a ZIP code, an amount, a meter "
                    "reading) to a server; prints `file<TAB>text<TAB>confidence` per file, in file order "
                    "(text is empty for an image with no ink). Any number of files, as for predict.")
    _add_file_client_flags(parser, batch=16)
    parser.set_defaults(func=run_read)


def _add_file_client_flags(parser: argparse.ArgumentParser, batch: int) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files")
    parser.add_argument("--server", default="localhost:50051", help="host:port of the server")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of text lines")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up on a request")
    parser.add_argument("--batch", type=int, default=batch,
                        help=f"images per request (default {batch}; the server's limit is "
                             "--max-images-per-request, 256 by default)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests at once (default 4)")
    add_tls_client_flags(parser)


def run_predict(args: argparse.Namespace) -> int:
    def row(answer: Any) -> dict[str, Any]:
        return {"digit": answer.digit, "confidence": round(answer.confidence, 6),
                "probabilities": [round(v, 6) for v in answer.probabilities],
                "accepted": answer.accepted, "rejection": answer.rejection}

    def line(answer: Any) -> str:
        return f"{answer.digit}\t{answer.confidence:.4f}\t{answer.rejection or 'accepted'}"

    return _run_files("predict", args, lambda client, items: client.recognize_many(
        items, batch=args.batch, in_flight=args.in_flight), row, line)


def run_read(args: argparse.Namespace) -> int:
    def row(reading: Any) -> dict[str, Any]:
        return {"text": reading.text, "confidence": round(reading.confidence, 6), "accepted": reading.accepted,
                "rejection": reading.rejection,
                "digits": [{"digit": d.prediction.digit, "confidence": round(d.prediction.confidence, 6),
                            "accepted": d.prediction.accepted, "rejection": d.prediction.rejection,
                            "box": list(d.box)} for d in reading.digits]}

    def line(reading: Any) -> str:
        return f"{reading.text}\t{reading.confidence:.4f}"

    return _run_files("read", args, lambda client, items: client.read_many(
        items, batch=args.batch, in_flight=args.in_flight), row, line)


def _run_files(command: str, args: argparse.Namespace, call: Callable[[Any, list[Any]], tuple[list[Any], str]],
               row: Callable[[Any], dict[str, Any]], line: Callable[[Any], str]) -> int:
    """Send every file, print the answers in file order, name each failure on stderr."""
    from service.client import DigitsClient, Failure, read_files

    if args.batch < 1 or args.in_flight < 1:
        print(f"digits {command}: --batch and --in-flight must be >= 1", file=sys.stderr)
        return 2
    try:
        tls, token = tls_from_args(args), token_from_args(args)
    except ValueError as exc:
        print(f"digits {command}: {exc}", file=sys.stderr)
        return 2
    with DigitsClient(args.server, tls=tls, timeout=args.timeout, token=token) as client:
        outcomes, model = call(client, read_files(args.files))
    name, _, version = model.partition(" ")
    rows: list[dict[str, Any]] = []
    for path, outcome in zip(args.files, outcomes, strict=True):
        if isinstance(outcome, Failure):
            print(f"digits {command}: {path}: {outcome.code}: {outcome.message}", file=sys.stderr)
            rows.append({"file": str(path), "error": {"code": outcome.code, "message": outcome.message}})
        else:
            rows.append({"file": str(path), **row(outcome), "model": name, "model_version": version})
            if not args.json:
                print(f"{path}\t{line(outcome)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if any(isinstance(o, Failure) for o in outcomes) else 0


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


REGISTRARS: list[Callable[[Subparsers], None]] = [register_serve, register_predict, register_read, register_health,
                                                   register_performance]
