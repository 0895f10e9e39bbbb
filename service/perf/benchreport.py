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

from service.perf.bench import LOAD_POINTS, BenchResults, Point
from service.perf.machine import loadavg

BEGIN = "<!-- digits bench: generated section begins; edits inside are overwritten -->"
END = "<!-- digits bench: generated section ends -->"

@dataclass(frozen=True)
class Target:
    """One goal of issue #6, as measured."""

    name: str
    measured: str
    goal: str
    met: bool | None  # None: not measured in this run


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def evaluate_targets(r: BenchResults) -> list[Target]:
    """The four targets of the issue, each a ratio within this run."""
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
    return targets


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
