"""Render `digits bench` results: the targets as ratios, Markdown tables, the machine, and a PNG plot.

The report is written between two marker lines of docs/benchmarks.md, so the hand-written parts of
that file (how to run it, what the profiler showed) survive a re-run; a new file gets a title.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from pathlib import Path

from service.perf.bench import (
    ANALYZER_POINTS,
    FLOOR,
    LOAD_POINTS,
    MLSERVER,
    OURS,
    READ_CONCURRENCY,
    READ_DIGITS,
    V2_POINTS,
    BenchResults,
    Point,
    V2Point,
)
from service.perf.machine import loadavg

BEGIN = "<!-- digits bench: generated section begins; edits inside are overwritten -->"
END = "<!-- digits bench: generated section ends -->"

@dataclass(frozen=True)
class Target:
    """One goal (issues #6 and #17), as measured."""

    name: str
    measured: str
    goal: str
    met: bool | None  # None: not measured in this run


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


# Issue #17: ours / floor at each point, driven by tritonclient.grpc.aio (the floor runs no model).
FLOOR_GOALS = {(16, 1): 0.70, (64, 1): 0.70, (4, 64): 0.33}
PEER_GAIN = 2.0


def _why(r: BenchResults, *keys: str) -> str:
    return next((f"not measured: {r.not_measured[k]}" for k in keys if k in r.not_measured), "not measured")


def v2_targets(r: BenchResults) -> list[Target]:
    """Issue #17's targets: ours / floor, and ours / MLServer with a lower p99, at each load point."""
    targets = []
    for (c, b), goal in FLOOR_GOALS.items():
        ours, floor = r.find_v2("tritonclient", OURS, c, b), r.find_v2("tritonclient", FLOOR, c, b)
        name = f"Open Inference Protocol c{c} x{b}: ours vs the floor (tritonclient.grpc.aio, FP32)"
        if ours and floor:
            share = _ratio(ours.images_per_s, floor.images_per_s)
            targets.append(Target(name, f"{share:.2f} ({ours.images_per_s:,.0f} vs {floor.images_per_s:,.0f} "
                                        f"images/s)", f">= {goal:.2f}", share >= goal))
        else:
            targets.append(Target(name, _why(r, "Open Inference Protocol"), f">= {goal:.2f}", None))
    for c, b in FLOOR_GOALS:
        ours, peer = r.find_v2("tritonclient", OURS, c, b), r.find_v2("tritonclient", MLSERVER, c, b)
        name = f"Open Inference Protocol c{c} x{b}: ours vs MLServer (tritonclient.grpc.aio, FP32)"
        wanted = f">= {PEER_GAIN:g}x, lower p99"
        if ours and peer:
            gain = _ratio(ours.images_per_s, peer.images_per_s)
            targets.append(Target(name, f"{gain:.2f}x ({ours.images_per_s:,.0f} vs {peer.images_per_s:,.0f} "
                                        f"images/s); p99 {ours.p99_s * 1e3:.2f} vs {peer.p99_s * 1e3:.2f} ms", wanted,
                                  gain >= PEER_GAIN and ours.p99_s < peer.p99_s))
        else:
            targets.append(Target(name, _why(r, "Open Inference Protocol", MLSERVER), wanted, None))
    return targets


def evaluate_targets(r: BenchResults) -> list[Target]:
    """The targets of issues #6 and #17, each a ratio within this run."""
    targets = []
    batched = r.find("batching on", "raw", 4, 64)
    # The ceiling measured beside the batched point (same machine load), else the one from the start.
    ceiling = sum(r.paired_ceiling) / len(r.paired_ceiling) if r.paired_ceiling else r.ceiling.get(64, math.nan)
    if batched:
        share = _ratio(batched.summary.images_per_s, ceiling)
        targets.append(Target("Batched requests (c4, 64 raw images each) vs in-process batch 64",
                              f"{share:.0%} ({batched.summary.images_per_s:,.0f} / {ceiling:,.0f} images/s)",
                              ">= 60%", share >= 0.6))
    on, off = r.find("batching on", "raw", 64, 1), r.find("batching off", "raw", 64, 1)
    if on and off:
        gain = _ratio(on.summary.requests_per_s, off.summary.requests_per_s)
        p99_on, p99_off = on.summary.latency_s["p99"], off.summary.latency_s["p99"]
        targets.append(Target("Single images at c64: dynamic batching on vs off",
                              f"{gain:.2f}x throughput ({on.summary.requests_per_s:,.0f} vs "
                              f"{off.summary.requests_per_s:,.0f} req/s); p99 {p99_on * 1e3:.2f} vs "
                              f"{p99_off * 1e3:.2f} ms", ">= 2.5x, lower p99", gain >= 2.5 and p99_on < p99_off))
    single = r.find("batching on", "raw", 1, 1)
    if single and r.echo:
        floor = r.echo.latency_s["p50"] + r.single_run_s
        p50 = single.summary.latency_s["p50"]
        targets.append(Target("Concurrency 1: median latency vs (bare gRPC round trip + one session.run)",
                              f"{_ratio(p50, floor):.2f}x ({p50 * 1e3:.3f} ms vs {r.echo.latency_s['p50'] * 1e3:.3f}"
                              f" + {r.single_run_s * 1e3:.3f} ms)", "<= 2x", p50 <= 2 * floor))
    for concurrency, batch in LOAD_POINTS:
        png, raw = r.find("batching on", "png", concurrency, batch), r.find("batching on", "raw", concurrency, batch)
        if png and raw and png.server_cpu_per_image_us and raw.server_cpu_per_image_us:
            cost = png.server_cpu_per_image_us / raw.server_cpu_per_image_us
            targets.append(Target(f"PNG vs raw server CPU per image (c{concurrency}, {batch}/request)",
                                  f"{cost:.2f}x ({png.server_cpu_per_image_us:,.0f} vs "
                                  f"{raw.server_cpu_per_image_us:,.0f} µs)", "<= 1.5x", cost <= 1.5))
    return targets + v2_targets(r)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _point_row(p: Point) -> str:
    s = p.summary
    lat = s.latency_s
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "0"
    return (f"| {p.server} | {p.encoding} | {p.concurrency} | {p.batch} | {s.requests_per_s:,.0f} | "
            f"{s.images_per_s:,.0f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | "
            f"{_ms(lat['max'])} | {errors} | {_us(p.server_cpu_per_image_us)} | {_us(p.client_cpu_per_request_us)} |")


def _v2_cell(p: V2Point | None) -> tuple[str, str, str]:
    if p is None:
        return "-", "-", "-"
    errors = f" ({p.errors} errors)" if p.errors else ""
    return (f"{p.images_per_s:,.0f}{errors}", f"{_ms(p.p50_s)} / {_ms(p.p99_s)}", _us(p.server_cpu_per_image_us))


def _v2_section(r: BenchResults) -> list[str]:
    lines = ["", "### Open Inference Protocol: ours against the floor and MLServer", "",
             "The same FP32 tensors [b, 1, 28, 28] (the bench's digits, normalized) to every server, from the same "
             "client engine: `tritonclient.grpc.aio` closed loop in this process (c calls in flight over the given "
             "number of connections, asking for `probabilities`), then Triton's `perf_analyzer -i grpc` (its own "
             "threads, synchronous calls, 3 windows). **ours**: `digits serve` with its defaults; **floor**: a "
             "grpc.aio servicer that parses ModelInfer and answers a canned [N, 10] reply (no model, batching or "
             "metrics); "
             "**MLServer**: 1.7.1 with the same model (onnxruntime, 1 thread, adaptive batching off, inference "
             "in-process, metrics off). Server CPU is per image, over the measured window.", "",
             "| engine | concurrency | images/request | connections | ours images/s | floor images/s "
             "| MLServer images/s | ours p50 / p99 ms | floor p50 / p99 ms | MLServer p50 / p99 ms | ours / floor "
             "| ours / MLServer | server CPU µs/image: ours / floor / MLServer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = [("tritonclient", c, b, n) for c, b, n in V2_POINTS]
    keys += [("perf_analyzer", c, b, 1) for c, b in ANALYZER_POINTS]
    for engine, c, b, n in keys:
        ours, floor, peer = (r.find_v2(engine, s, c, b, n) for s in (OURS, FLOOR, MLSERVER))
        if not (ours or floor or peer):
            continue
        cells = [_v2_cell(p) for p in (ours, floor, peer)]
        share = f"{_ratio(ours.images_per_s, floor.images_per_s):.2f}" if ours and floor else "-"
        gain = f"{_ratio(ours.images_per_s, peer.images_per_s):.2f}x" if ours and peer else "-"
        engine_name = "tritonclient.grpc.aio" if engine == "tritonclient" else "perf_analyzer"
        lines.append(f"| {engine_name} | {c} | {b} | {n} | {cells[0][0]} | {cells[1][0]} | {cells[2][0]} | "
                     f"{cells[0][1]} | {cells[1][1]} | {cells[2][1]} | {share} | {gain} | "
                     f"{cells[0][2]} / {cells[1][2]} / {cells[2][2]} |")
    if r.not_measured:
        lines.append("")
        lines += [f"Not measured: {what}: {why}" for what, why in r.not_measured.items()]
    if r.read is not None:
        p = r.read
        s = p.summary
        exact = f"{s.accuracy:.1%}" if s.accuracy is not None else "-"
        lines += ["", "### Reading whole numbers", "",
                  f"`Read` of one {READ_DIGITS}-digit PNG per request (numbers composed from the bench's real digits: "
                  f"spaced, tight and touching in turn), concurrency {READ_CONCURRENCY}, the `digits loadtest` engine, "
                  "`digits serve` with its defaults.", "",
                  "| readings/s | p50 ms | p99 ms | errors | exact readings | server CPU µs/reading |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {s.images_per_s:,.1f} | {_ms(s.latency_s['p50'])} | {_ms(s.latency_s['p99'])} | "
                  f"{s.error_count} | {exact} | {_us(p.server_cpu_per_image_us)} |"]
    return lines


def render(r: BenchResults, plot_name: str | None) -> str:
    """The generated Markdown section."""
    opts = r.options
    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    lines = [BEGIN, "", f"## Results ({'quick run' if opts.quick else 'full run'}, {when})", "",
             f"`digits bench{' --quick' if opts.quick else ''}` on model `{opts.model}`"
             f"{f' and `{opts.int8_model}`' if opts.int8_model else ''}, images: {r.images}; "
             f"onnxruntime {r.threads} intra-op threads (server and in-process alike). All servers run at once; "
             f"{opts.rounds} round(s) visit every load point and measure every server there back to back "
             f"(alternating order; raw, then PNG), {opts.warmup_s:g} s warm-up + {opts.measure_s / opts.rounds:g} s "
             f"measured each time, closed loop, so ratios compare figures taken under the same load. "
             f"Run took {r.seconds:.0f} s.",
             "", "| machine | |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in r.machine.items()]
    lines += [f"| load after | {loadavg()} |", "",
              "Client (the `digits loadtest` engine) and server run on the same machine and share its cores; "
              "other processes may be running too (see the load average). Absolute figures are this "
              "machine's; the targets are ratios within this one run.", "", "### Targets", "",
              "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for t in evaluate_targets(r):
        met = "not measured" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.measured} | {t.goal} | {met} |")
    lines += ["", "### In-process ceiling (onnxruntime, same model and threads, no server)", "",
              "| batch | images/s |" + (" int8 images/s |" if r.int8_ceiling else ""),
              "| --- | --- |" + (" --- |" if r.int8_ceiling else "")]
    for batch, rate in r.ceiling.items():
        int8 = r.int8_ceiling.get(batch)
        lines.append(f"| {batch} | {rate:,.0f} |" + ((f" {int8:,.0f} |" if int8 else " - |") if r.int8_ceiling else ""))
    lines += ["", f"One single-image `session.run`: median {r.single_run_s * 1e3:.3f} ms."]
    if r.paired_ceiling:
        lines.append("Batch 64 measured again beside the batched load point (the target's ceiling): "
                     + ", ".join(f"{v:,.0f}" for v in r.paired_ceiling) + " images/s.")
    if r.echo:
        e = r.echo.latency_s
        lines.append(f"Bare grpc.aio unary round trip (trivial servicer, its own process, concurrency 1): "
                     f"p50 {_ms(e['p50'])} ms, p99 {_ms(e['p99'])} ms, {r.echo.requests_per_s:,.0f} calls/s.")
    lines += ["", "### Load points", "",
              "Server CPU is utime + stime of the server process tree over the measured window, per image; "
              "client CPU is this process's, per request.", "",
              "| server | payload | concurrency | images/request | requests/s | images/s | p50 ms | p90 ms | "
              "p99 ms | max ms | errors | server CPU µs/image | client CPU µs/request |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_point_row(p) for p in r.points]
    lines += _v2_section(r)
    if r.accuracy:
        lines += ["", "Accuracy on the bench's labelled digits (in-process): "
                  + ", ".join(f"{k} {v:.2%}" for k, v in r.accuracy.items()) + "."]
    lines += [""] + [f"Note: {n}" for n in r.notes] + ([""] if r.notes else [])
    if plot_name:
        lines += [f"![throughput and p99 latency against concurrency]({plot_name})", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def plot(r: BenchResults, path: Path) -> str | None:
    """Throughput and p99 against concurrency for single-image requests; None, or why not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the `train` extra): no plot"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in ("batching off", "batching on"):
        for encoding, style in (("raw", "-o"), ("png", "--s")):
            pts = sorted((p for p in r.points if p.server == server and p.encoding == encoding and p.batch == 1),
                         key=lambda p: p.concurrency)
            if not pts:
                continue
            xs = [p.concurrency for p in pts]
            label = f"{server}, {encoding}"
            left.plot(xs, [p.summary.images_per_s for p in pts], style, label=label)
            right.plot(xs, [p.summary.latency_s["p99"] * 1e3 for p in pts], style, label=label)
    for axis, title, unit in ((left, "throughput, 1 image/request", "images/s"),
                              (right, "p99 latency, 1 image/request", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks([c for c, b in LOAD_POINTS if b == 1], [str(c) for c, b in LOAD_POINTS if b == 1])
        axis.set_xlabel("concurrency (requests in flight)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"digits bench{' --quick' if r.options.quick else ''}: {r.machine.get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(r: BenchResults, out: Path, plot_path: Path | None) -> None:
    """Write the plot, then the generated section into `out` (replacing a previous one)."""
    plot_name = None
    if plot_path is not None:
        problem = plot(r, plot_path)
        if problem:
            r.notes.append(problem)
        else:
            plot_name = os.path.relpath(plot_path, out.parent)
    section = render(r, plot_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + section
    out.write_text(text)
