"""`make soak`: a hostile mix for a bounded time against a real `digits serve`, then what it cost.

    python tests/soak.py --seconds 60 [--clients 4] [--json]

Clients send, round-robin, every kind of request that used to cost the server far more than it should
(tests/hostile.py): small PNGs declaring 25M pixels, a raw 4000x4000 image, JSON with a million keys, a
16 MB typed tensor, an ICO embedding a bomb, garbage protobuf, streams of failing messages with 64 KiB
ids, 40 MB multipart text fields, connections that never finish their headers. A prober meanwhile
makes small Recognize calls. At the end: the server's peak RSS growth, the worst event-loop lag it
recorded, the prober's latencies, how much the log grew, every request's status, and whether the
server still answers. Exit status 1 when a bound is broken.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from service.client import to_image
from service.gen.digits.v1 import digits_pb2, digits_pb2_grpc
from tests.harness import scrape
from tests.hostile import DIGITS, HOSTILE, MiB, Served, hostile_call, page_bomb, status_of

# What a run must stay within (the same bounds as tests/server/test_hostile.py).
MAX_RSS_GROWTH = 512 * MiB
MAX_PROBE_S = 0.25
MAX_LOG_BYTES_PER_S = 20_000


def extra_calls(served: Served) -> dict[str, Callable[[], object]]:
    """The kinds of hostile request beyond tests/hostile.HOSTILE."""
    inner = page_bomb(ink=False)
    ico = b"\x00\x00\x01\x00\x01\x00" + bytes([16, 16, 0, 0, 1, 0, 32, 0]) + len(inner).to_bytes(4, "little") + \
        (22).to_bytes(4, "little") + inner
    ico_request = digits_pb2.RecognizeRequest(images=[digits_pb2.Image(encoded=ico)]).SerializeToString()
    long_ids = [digits_pb2.StreamRequest(id=f"{i}" + "x" * 65536) for i in range(200)]

    def grpc_bytes(method: str, body: bytes) -> Callable[[], object]:
        def call() -> object:
            with grpc.insecure_channel(served.target) as channel:
                return status_of(lambda: channel.unary_unary(method)(body, timeout=30))
        return call

    def stream_of_failures() -> object:
        with grpc.insecure_channel(served.target) as channel:
            return len(list(digits_pb2_grpc.DigitRecognizerStub(channel).RecognizeStream(iter(long_ids),
                                                                                         timeout=60)))

    def huge_text_field() -> object:
        from tests.harness import request

        def body() -> object:
            yield b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
            for _ in range(40):
                yield b"z" * MiB
            yield b"\r\n--b--\r\n"
        return request(served.http, "POST", "/v1/recognize", body(),  # type: ignore[arg-type]
                       {"Content-Type": "multipart/form-data; boundary=b"})

    def slow_headers() -> object:
        socks = [socket.create_connection(("127.0.0.1", served.http_port)) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)  # not synchronisation: how long these clients dawdle before giving up
        for sock in socks:
            sock.close()
        return len(socks)

    return {"ICO embedding a bomb": grpc_bytes("/digits.v1.DigitRecognizer/Recognize", ico_request),
            "garbage protobuf": grpc_bytes("/digits.v1.DigitRecognizer/Recognize", b"\xff" * 64),
            "stream of 64 KiB ids": stream_of_failures, "40 MB multipart text field": huge_text_field,
            "slow headers": slow_headers}


def soak(seconds: float, clients: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        served = Served(Path(tmp), "--http-idle-timeout-s", "2")
        try:
            return _measure(served, seconds, clients)
        finally:
            served.stop()


def _measure(served: Served, seconds: float, clients: int) -> dict[str, object]:
    calls = {kind: hostile_call(served, kind) for kind in HOSTILE} | extra_calls(served)
    kinds = itertools.cycle(sorted(calls))
    lock = threading.Lock()
    sent: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds
    base_rss = served.reset_peak()
    base_log = served.log_bytes()

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                kind = next(kinds)
            calls[kind]()
            with lock:
                sent[kind] += 1

    probes: list[float] = []

    def prober() -> None:
        with grpc.insecure_channel(served.target) as channel:
            stub = digits_pb2_grpc.DigitRecognizerStub(channel)
            one = digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])])
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                stub.Recognize(one, timeout=30)
                probes.append(time.perf_counter() - started)
                time.sleep(0.02)  # not synchronisation: the probe rate, 50 calls a second

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=prober)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    metrics = scrape(served.metrics_port)
    lag_buckets = sorted((float(labels["le"]), value)
                         for labels, value in metrics.samples["digits_event_loop_lag_seconds_bucket"])
    total_ticks = metrics.value("digits_event_loop_lag_seconds_count")
    worst_lag = next((le for le, count in lag_buckets if count >= total_ticks), float("inf"))
    codes = {f"{labels['rpc']} {labels['code']}": int(v) for labels, v in metrics.samples["digits_requests_total"]
             if v}
    with grpc.insecure_channel(served.target) as channel:
        still = digits_pb2_grpc.DigitRecognizerStub(channel).Recognize(
            digits_pb2.RecognizeRequest(images=[to_image(DIGITS[0])]), timeout=30).predictions[0].digit
    return {
        "seconds": seconds, "clients": clients, "hostile_requests": dict(sent),
        "peak_rss_growth_mib": round((served.status("VmHWM") - base_rss) / MiB, 1),
        "worst_loop_lag_bucket_s": worst_lag,
        "probe_calls": len(probes), "probe_p50_ms": round(1000 * float(np.percentile(probes, 50)), 2),
        "probe_p99_ms": round(1000 * float(np.percentile(probes, 99)), 2),
        "probe_max_ms": round(1000 * max(probes), 2),
        "log_growth_bytes": served.log_bytes() - base_log, "requests_by_status": codes,
        "still_serving": still == int(fixture_label_0()),
    }


def fixture_label_0() -> int:
    from tests.harness import fixture_digits

    return int(fixture_digits()[1][0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to soak (default 60)")
    parser.add_argument("--clients", type=int, default=4, help="hostile clients at once (default 4)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    report = soak(args.seconds, args.clients)
    broken = []
    if float(report["peak_rss_growth_mib"]) * MiB > MAX_RSS_GROWTH:  # type: ignore[arg-type]
        broken.append("peak RSS")
    if float(report["probe_max_ms"]) / 1000 > MAX_PROBE_S:  # type: ignore[arg-type]
        broken.append("small-call latency")
    if int(report["log_growth_bytes"]) > MAX_LOG_BYTES_PER_S * args.seconds:  # type: ignore[call-overload]
        broken.append("log growth")
    if not report["still_serving"]:
        broken.append("still serving")
    report["bounds_broken"] = broken
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:28} {value}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
