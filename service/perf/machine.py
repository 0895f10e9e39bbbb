"""What a benchmark ran on: CPU, cores, memory, OS and the package versions that matter."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path

from service.recognition.model import available_cpus

PACKAGES = ("onnxruntime", "grpcio", "protobuf", "numpy", "pillow", "prometheus-client")


def describe_machine() -> dict[str, str]:
    """CPU, cores, memory, OS and the versions that matter, for the report."""
    cpu = "unknown"
    memory = "unknown"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    versions = []
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package} {metadata.version(package)}")
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {available_cpus()} available to this process",
        "memory": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "load_before": loadavg(),
    }


def loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "unknown"
