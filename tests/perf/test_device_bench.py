"""`digits bench --device`: the GPU machine's one short run, exercised here on the CPU (the same plan), and
the honest report when the machine's onnxruntime offers no CUDA provider."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from service.cli import main
from service.perf.devicebench import BATCHES, SERVER_POINTS
from tests.harness import FIXTURE_DIR, SHIPPED_MODEL


def test_cpu_plan_measures_every_part_and_checks_placement(tmp_path: Path) -> None:
    out = tmp_path / "cpu.md"
    code = main(["bench", "--device", "cpu", "--quick", "--model", str(SHIPPED_MODEL), "--images", str(FIXTURE_DIR),
                 "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    # Every node of LeNet-5 ran, each on the provider asked for, and the server says it serves on it.
    assert len(report["placement"]) >= 8 and set(report["placement"].values()) == {"CPUExecutionProvider"}
    assert report["server_provider"] == {"cpu": "CPUExecutionProvider"}
    assert set(report["ceiling"]["cpu"]) == {str(b) for b in BATCHES}
    assert all(figures["images_per_s"] > 0 for figures in report["ceiling"]["cpu"].values())
    measured = {(p["engine"], p["concurrency"], p["batch"]) for p in report["points"]}
    assert measured == {(e, c, b) for c, b in SERVER_POINTS for e in ("tritonclient FP32", "Recognize raw")}
    assert all(p["errors"] == 0 and p["images_per_s"] > 0 for p in report["points"])
    text = out.read_text()
    assert "all on CPUExecutionProvider" in text and "| 1024 |" in text
    assert "| --device cpu | tritonclient FP32 | 64 | 1 |" in text


def test_cuda_without_a_cuda_provider_says_so_with_the_provider_list(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        pytest.skip("this machine's onnxruntime offers CUDA: the GPU run itself is what applies here")
    out = tmp_path / "cuda.md"
    assert main(["bench", "--device", "cuda", "--model", str(SHIPPED_MODEL), "--out", str(out)]) == 1
    text = out.read_text()
    assert "**Not measured:** --device cuda: onnxruntime offers no CUDAExecutionProvider" in text
    assert f"`{available}`" in text  # the exact output of get_available_providers()
    assert "not measured" in capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["points"] == []
