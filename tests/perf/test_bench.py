"""`digits bench`: `--quick` measures every part end to end and writes the report and plot; the targets
are computed as the issue defines them; a re-run replaces only the generated section of the doc."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.cli import main
from service.perf.bench import BenchOptions, BenchResults, Point, V2Point
from service.perf.benchreport import BEGIN, END, evaluate_targets, write_report
from service.perf.loadstats import Summary
from tests.harness import FIXTURE_DIR, ROOT, SHIPPED_MODEL


def test_quick_bench_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "docs" / "benchmarks.md"
    # With --token-file: every server requires the token and every load point must send it (no errors below).
    tokens = tmp_path / "tokens"
    tokens.write_text("bench-token\n")
    code = main(["bench", "--quick", "--model", str(SHIPPED_MODEL), "--int8-model",
                 str(ROOT / "models" / "lenet5-int8.onnx"), "--images", str(FIXTURE_DIR), "--out", str(out),
                 "--token-file", str(tokens), "--peer", "mlserver"])
    assert code == 0
    text = out.read_text()
    assert text.count(BEGIN) == text.count(END) == 1
    for heading in ("### Targets", "### In-process ceiling", "### Load points", "| machine |"):
        assert heading in text
    for server in ("batching off", "batching on", "2 workers", "int8"):
        assert f"| {server} |" in text
    for concurrency, batch in ((1, 1), (16, 1), (64, 1), (4, 64)):
        for encoding in ("raw", "png"):
            assert f"| batching on | {encoding} | {concurrency} | {batch} |" in text
    assert "Bare grpc.aio unary round trip" in text and "load after" in text
    assert (out.parent / "benchmarks.png").stat().st_size > 10_000
    assert "![throughput and p99 latency against concurrency](benchmarks.png)" in text
    captured = capsys.readouterr()
    printed = captured.out
    assert "Batched requests" in printed and f"wrote {out}" in printed
    errors = [int(n) for n in re.findall(r"errors (\d+)", captured.err)]
    assert errors and not any(errors), "load points with errors: the token did not reach every server"
    assert "every server ran with --auth-token-file" in text
    # The floor and MLServer take no token, so with --token-file the v2 comparison says why it is missing.
    assert "Not measured: Open Inference Protocol: not measured with --token-file" in text
    assert "### Reading whole numbers" in text


def test_quick_bench_measures_ours_the_floor_and_mlserver_with_both_engines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "benchmarks.md"
    code = main(["bench", "--quick", "--model", str(SHIPPED_MODEL), "--int8-model", str(tmp_path / "none.onnx"),
                 "--images", str(FIXTURE_DIR), "--out", str(out), "--workers", "1", "--peer", "mlserver"])
    assert code == 0
    text = out.read_text()
    assert "### Open Inference Protocol: ours against the floor and MLServer" in text
    rows = {tuple(cell.strip() for cell in line.split("|")[1:5]): line for line in text.splitlines()
            if line.startswith(("| tritonclient.grpc.aio |", "| perf_analyzer |"))}
    for c, b, n in ((16, 1, 1), (64, 1, 1), (64, 1, 8), (4, 64, 1)):
        row = rows[("tritonclient.grpc.aio", str(c), str(b), str(n))]
        cells = [cell.strip() for cell in row.split("|")[5:8]]
        assert all(re.fullmatch(r"[\d,]+", cell) for cell in cells), row  # ours, floor and MLServer measured
    assert re.search(r"\| perf_analyzer \| 16 \| 1 \| 1 \| [\d,]+ \| [\d,]+ \|", text)
    # MLServer has no ModelConfig, which perf_analyzer reads first: said, not hidden.
    assert "Not measured: perf_analyzer on MLServer: perf_analyzer exited" in text and "model config" in text
    printed = capsys.readouterr().out
    for c, b in ((16, 1), (64, 1), (4, 64)):
        assert f"Open Inference Protocol c{c} x{b}: ours vs the floor" in printed
        assert f"Open Inference Protocol c{c} x{b}: ours vs MLServer" in printed
    assert re.search(r"\| [\d.,]+ \| [\d.]+ \| [\d.]+ \| 0 \| [\d.]+% \|", text)  # the Read point, no errors


def _summary(requests_per_s: float, batch: int, p50_ms: float, p99_ms: float) -> Summary:
    requests = int(requests_per_s * 2)
    latency = {"p50": p50_ms / 1e3, "p90": p99_ms / 1e3, "p99": p99_ms / 1e3, "max": p99_ms / 1e3,
               "mean": p50_ms / 1e3}
    return Summary(requests, requests, {}, requests * batch, 2.0, latency)


def _results() -> BenchResults:
    results = BenchResults(BenchOptions(model=Path("m.onnx")), threads=2, images="test", machine={"cpu": "test"})
    results.ceiling = {1: 10_000.0, 8: 40_000.0, 64: 100_000.0, 256: 110_000.0}
    results.single_run_s = 0.0001
    results.echo = _summary(2000, 0, 0.4, 1.0)
    on, off = "batching on", "batching off"
    results.points = [
        Point(on, "raw", 4, 64, _summary(1000, 64, 10, 20), server_cpu_s=1.28, client_cpu_s=1.0),  # 64k img/s
        Point(on, "png", 4, 64, _summary(1000, 64, 20, 40), server_cpu_s=1.28 * 1.4, client_cpu_s=1.0),
        Point(on, "raw", 64, 1, _summary(3000, 1, 20, 30), server_cpu_s=3.0, client_cpu_s=1.0),
        Point(off, "raw", 64, 1, _summary(1000, 1, 60, 90), server_cpu_s=3.0, client_cpu_s=1.0),
        Point(on, "raw", 1, 1, _summary(1000, 1, 1.1, 2.0), server_cpu_s=1.0, client_cpu_s=1.0),
    ]
    return results


def test_targets_are_the_issues_ratios() -> None:
    results = _results()
    targets = {t.name.split(" (")[0].split(":")[0]: t for t in evaluate_targets(results)}
    assert set(targets) == {"Batched requests", "Single images at c64", "Concurrency 1",
                            "PNG vs raw server CPU per image", "Open Inference Protocol c16 x1",
                            "Open Inference Protocol c64 x1", "Open Inference Protocol c4 x64"}
    assert targets["Batched requests"].met and targets["Batched requests"].measured.startswith("64%")
    assert targets["Single images at c64"].met and targets["Single images at c64"].measured.startswith("3.00x")
    # 1.1 ms against 2 x (0.4 ms round trip + 0.1 ms session.run): 2.2x, over the bound.
    assert not targets["Concurrency 1"].met and targets["Concurrency 1"].measured.startswith("2.20x")
    png = targets["PNG vs raw server CPU per image"]
    assert png.met and png.measured.startswith("1.40x")
    v2 = [t for t in evaluate_targets(results) if t.name.startswith("Open Inference Protocol")]
    assert len(v2) == 6 and all(t.met is None and t.measured.startswith("not measured") for t in v2)
    results.not_measured["MLServer"] = "MLServer is not installed"
    results.v2 = [V2Point("tritonclient", server, c, b, 1, rate, 0.002, p99) for c, b in ((16, 1), (64, 1), (4, 64))
                  for server, rate, p99 in (("ours", 3500.0, 0.004), ("floor", 5000.0, 0.003))]
    named = {t.name: t for t in evaluate_targets(results) if t.name.startswith("Open Inference Protocol")}
    share = named["Open Inference Protocol c16 x1: ours vs the floor (tritonclient.grpc.aio, FP32)"]
    assert share.met and share.measured.startswith("0.70 (3,500 vs 5,000")  # 0.70 is the goal: met
    peer = named["Open Inference Protocol c4 x64: ours vs MLServer (tritonclient.grpc.aio, FP32)"]
    assert peer.met is None and peer.measured == "not measured: MLServer is not installed"
    results.points[2] = Point("batching on", "raw", 64, 1, _summary(3000, 1, 20, 95), 3.0, 1.0)
    slower_tail = next(t for t in evaluate_targets(results) if t.name.startswith("Single images"))
    assert not slower_tail.met  # 3x the throughput, but a higher p99: not met


def test_report_replaces_only_its_own_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(f"# Benchmarks\n\nHand-written intro.\n\n{BEGIN}\nold figures\n{END}\n\n## Profiling\n\nNotes.\n")
    write_report(_results(), out, None)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written intro.") and text.rstrip().endswith("Notes.")
    assert "old figures" not in text and text.count(BEGIN) == 1 and "| batching on | raw | 4 | 64 |" in text
    fresh = tmp_path / "new.md"
    write_report(_results(), fresh, None)
    assert fresh.read_text().startswith("# Benchmarks") and BEGIN in fresh.read_text()
    # The in-process ceiling is reported as measured, one row per batch size.
    assert "| 64 | 100,000 |" in text and "| 256 | 110,000 |" in text
