"""The performance subcommands of `digits`: loadtest and bench.

Registered on every `digits` invocation, so this module imports only the standard library; each
handler imports the load generator or the benchmark when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.client_flags import add_tls_client_flags, tls_from_args, token_from_args

DEFAULT_DURATION_S = 10.0
REQUESTS_CAP_S = 300.0


def register_loadtest(subparsers: Any) -> None:
    """Add `digits loadtest`."""
    parser = subparsers.add_parser(
        "loadtest", help="load-test a running server: throughput, latency percentiles, errors, accuracy",
        description="Send Recognize requests to --server (and nowhere else) for a bounded time and report "
                    "requests/s, images/s, latency p50/p90/p99/max, errors by gRPC status code and, when "
                    "the images have labels, accuracy under load.")
    parser.add_argument("--server", required=True, help="host:port of the server to load (required)")
    parser.add_argument("--protocol", choices=("digits", "v2"), default="digits",
                        help="digits.v1 Recognize (default) or Open Inference Protocol ModelInfer (raw UINT8 "
                             "tensors of 28x28 digits)")
    parser.add_argument("--model-name", default="lenet5", help="model name for --protocol v2 (default lenet5)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="closed loop: requests in flight; open loop: most outstanding (default 8)")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"seconds to measure (default {DEFAULT_DURATION_S:g}; with --requests: a cap, "
                             f"default {REQUESTS_CAP_S:g})")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: Poisson arrivals at this many requests/s (default: closed loop)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first (default 1)")
    parser.add_argument("--images", type=Path, default=None,
                        help="IDX folder, folder of image files (label = leading digit of the name or the "
                             "folder name) or one image file; default: synthetic scribbles")
    parser.add_argument("--encoding", choices=("raw", "png"), default="raw",
                        help="send raw 8-bit pixels or PNG files (default raw; image files go as they are "
                             "with png)")
    parser.add_argument("--connections", type=int, default=0,
                        help="HTTP/2 connections to spread the calls over (default min(concurrency, 4))")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each request in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed for synthetic images and arrivals")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no live progress line")
    add_tls_client_flags(parser)
    parser.set_defaults(func=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    """Run `digits loadtest`; exit 0 when at least one request succeeded."""
    from service.client import bearer_metadata
    from service.perf.loadsource import load_images, prepare_requests, prepare_v2_requests
    from service.perf.loadtest import PROTOCOLS, LoadSpec, run_load

    try:
        spec = LoadSpec(target=args.server, concurrency=args.concurrency, duration_s=args.duration,
                        requests=args.requests, rate=args.rate, warmup_s=args.warmup, timeout_s=args.timeout,
                        connections=args.connections, seed=args.seed)
        images = load_images(args.images, seed=args.seed)
        if args.protocol == "v2":
            if args.encoding != "raw":
                raise ValueError("--protocol v2 sends raw UINT8 tensors: --encoding png is not possible")
            prepared = prepare_v2_requests(images, args.batch, args.model_name)
        else:
            prepared = prepare_requests(images, args.batch, args.encoding)
        token = token_from_args(args)
    except (ValueError, OSError) as exc:  # SourceError and IdxError are ValueErrors
        print(f"digits loadtest: {exc}", file=sys.stderr)
        return 2
    tls = tls_from_args(args)
    mode = f"open loop {spec.rate:g} req/s" if spec.rate else f"concurrency {spec.concurrency}"
    print(f"digits loadtest: {spec.target} ({args.protocol}), {images.description}, {args.batch} {args.encoding} "
          f"image(s) per request, {mode}", file=sys.stderr)
    method, parse = PROTOCOLS[args.protocol]
    try:
        summary = run_load(spec, prepared, method=method, parse=parse,
                           credentials=tls.credentials() if tls else None, channel_options=tls.options() if tls else (),
                           progress=None if args.quiet else sys.stderr, metadata=bearer_metadata(token))
    except KeyboardInterrupt:
        return 130
    except ConnectionError as exc:
        print(f"digits loadtest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"server": spec.target, "protocol": args.protocol, "batch": args.batch,
                          "encoding": args.encoding, "concurrency": spec.concurrency, "rate": spec.rate,
                          "source": images.description,
                          **summary.to_json()}))
    else:
        print(summary.format_text())
    return 0 if summary.ok else 1


def register_bench(subparsers: Any) -> None:
    """Add `digits bench`."""
    parser = subparsers.add_parser(
        "bench", help="benchmark the server against in-process onnxruntime; write docs/benchmarks.md and a plot",
        description="Measure in one run: the in-process ceiling, a bare gRPC round trip, `digits serve` with "
                    "dynamic batching off and on at several load points (raw pixels and PNG), 1 vs 2 workers "
                    "and the int8 model; write the figures and the targets as ratios to a Markdown file and "
                    "a PNG plot. Servers run as subprocesses on free 127.0.0.1 ports.")
    parser.add_argument("--model", type=Path, default=Path("models/lenet5.onnx"), help="fp32 model to serve")
    parser.add_argument("--int8-model", type=Path, default=Path("models/lenet5-int8.onnx"),
                        help="int8 model to compare (skipped with a note when missing)")
    parser.add_argument("--images", type=Path, default=None,
                        help="IDX or image folder to send (default: tests/fixtures/mnist-small when present, "
                             "else synthetic scribbles)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads for servers and in-process runs (default: as `digits serve`)")
    parser.add_argument("--workers", type=int, default=2, help="also measure this many workers (default 2; 1 skips)")
    parser.add_argument("--quick", action="store_true",
                        help="short load points (a smoke test, well under a minute); figures are noisy")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write (default docs/benchmarks.md; with --quick "
                             "runs/bench-quick/benchmarks.md)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot (default: benchmarks.png beside --out)")
    parser.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                        help="run every server with --auth-token-file FILE and send its first token on every "
                             "call: measures the cost of authentication")
    parser.add_argument("--peer", action="append", choices=("mlserver",), default=[],
                        help="also measure this peer serving the same model: mlserver (MLServer 1.7.1 from "
                             "runs/mlserver-venv, which `make peer` installs, or from PATH); reported as not "
                             "measured, with the reason, when it cannot run")
    parser.add_argument("--mlserver", type=Path, default=None, metavar="PATH",
                        help="the mlserver executable for --peer mlserver")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="measure this device's path instead (for a GPU machine: one short run): the "
                             "providers onnxruntime offers, where each node runs, the in-process ceiling at "
                             "batch 1-1024 and `digits serve --device DEVICE` at c64 x1 and c16 x64, each "
                             "beside the CPU; writes --out (default runs/bench-device/DEVICE.md) and JSON; "
                             "exit 1 when DEVICE cannot run or a node falls back to the CPU")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run `digits bench`; exit 0 once the report is written (targets met or not)."""
    if args.device is not None:
        return run_device_bench(args)
    from service.perf.bench import BenchOptions
    from service.perf.bench import run_bench as measure
    from service.perf.benchreport import evaluate_targets, write_report

    out = args.out or Path("runs/bench-quick/benchmarks.md" if args.quick else "docs/benchmarks.md")
    images = args.images
    if images is None and Path("tests/fixtures/mnist-small").is_dir():
        images = Path("tests/fixtures/mnist-small")
    if not args.model.is_file():
        print(f"digits bench: model not found: {args.model}", file=sys.stderr)
        return 2
    try:
        token_from_args(args)  # the file must hold a token: fail here, not after the ceiling runs
    except ValueError as exc:
        print(f"digits bench: {exc}", file=sys.stderr)
        return 2
    options = BenchOptions(model=args.model, int8_model=args.int8_model, images=images, threads=args.threads,
                           quick=args.quick, workers=(1, args.workers) if args.workers > 1 else (1,),
                           token_file=args.token_file, peers=tuple(args.peer), mlserver=args.mlserver)
    try:
        results = measure(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"digits bench: {exc}", file=sys.stderr)
        return 1
    write_report(results, out, args.plot or out.with_suffix(".png"))
    for target in evaluate_targets(results):
        verdict = "not measured" if target.met is None else "met" if target.met else "NOT met"
        print(f"{verdict:8s} {target.name}: {target.measured} (goal {target.goal})")
    print(f"wrote {out}")
    return 0


def run_device_bench(args: argparse.Namespace) -> int:
    """Run `digits bench --device`; exit 0 when DEVICE ran every node and the report is written."""
    from service.perf.devicebench import run_device_bench as measure
    from service.perf.devicebench import write_device_report

    if not args.model.is_file():
        print(f"digits bench: model not found: {args.model}", file=sys.stderr)
        return 2
    images = args.images
    if images is None and Path("tests/fixtures/mnist-small").is_dir():
        images = Path("tests/fixtures/mnist-small")
    out = args.out or Path(f"runs/bench-device/{args.device}.md")
    try:
        report = measure(args.model, args.device, images, args.threads, args.quick,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"digits bench: {exc}", file=sys.stderr)
        return 1
    write_device_report(report, out)
    print(f"wrote {out}")
    if report.not_measured:
        print(f"digits bench: not measured: {report.not_measured}", file=sys.stderr)
        return 1
    if report.off_device:
        print(f"digits bench: nodes off {args.device}: {report.off_device}", file=sys.stderr)
        return 1
    return 0
