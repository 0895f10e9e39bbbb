"""Load an ONNX model for serving: check its signature and metadata, pick providers, warm it up."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.recognition.model_metadata import PROBABILITIES_OUTPUT, MetadataError, ModelMetadata

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model: the onnxruntime session plus what the server needs to know about it."""

    session: ort.InferenceSession
    metadata: ModelMetadata
    path: Path
    sha256: str
    providers: tuple[str, ...]
    load_seconds: float
    output_names: tuple[str, ...]
    threads: int  # onnxruntime intra-op threads

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> str:
        return self.metadata.version

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (the first in onnxruntime's priority list)."""
        return self.providers[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch [N,1,H,W] of normalized input; returns (logits, probabilities), each [N, classes]."""
        outputs = self.session.run(self.output_names, {self.metadata.input_name: batch})
        return outputs[0], outputs[1]


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: the smaller of its affinity mask and its cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def default_threads(workers: int = 1, cpus: int | None = None) -> int:
    """onnxruntime intra-op threads per server process for ``--threads 0``.

    Each process's event loop (gRPC I/O, decoding, replies) needs a CPU of its own; inference threads
    on that CPU only fight it. So the CPUs left after one per process are shared out, at least one
    thread each: 1 on a 2-CPU box, 15 on 16 CPUs, 1 per worker for 8 workers on 16 CPUs. On 2 CPUs this
    gave 34% more images/s for 64-image requests than one thread per CPU (docs/benchmarks.md).
    """
    cpus = available_cpus() if cpus is None else cpus
    return max(1, (cpus - workers) // workers)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU limit in CPUs (e.g. 1.5), or None when unlimited or unknown."""
    # cgroup v2: "max 100000" or "150000 100000"; v1: cfs_quota_us / cfs_period_us (-1 = unlimited).
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """The provider list for `device` given what onnxruntime offers; raises ModelLoadError for an
    impossible request (``cuda`` without CUDAExecutionProvider: no silent fallback)."""
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                "--device cuda: onnxruntime offers no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu (pip install '.[gpu]') "
                "on a machine with an NVIDIA GPU, or use --device auto/cpu"
            )
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: Path, device: str = "auto", threads: int = 0, warmup_batch: int = 64,
               available: Sequence[str] | None = None, *, name: str | None = None) -> LoadedModel:
    """Load and validate `path`, create the session and warm it up.

    `available` overrides onnxruntime's provider list (tests fake a CUDA machine with it). `name`, when
    given, is the name to serve the model as instead of the one in its metadata (KServe routes by the
    InferenceService's name).
    Raises ModelLoadError with a message naming the file and the problem.
    """
    started = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    offered = list(ort.get_available_providers() if available is None else available)
    providers = choose_providers(device, offered)
    options = ort.SessionOptions()
    threads = threads or default_threads()
    options.intra_op_num_threads = threads
    # One batch at a time reaches the session (the batcher serialises), so inter-op threads only add
    # contention on small machines.
    options.inter_op_num_threads = 1
    # Idle intra-op threads would spin (busy-wait) for the next run; on a server that is a core burnt
    # that the event loop and gRPC need: 2-3x the CPU per image under load (docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises several private exception types for bad files
        raise ModelLoadError(f"cannot load model {path}: not a valid ONNX model ({_first_line(exc)})") from exc
    try:
        metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    except MetadataError as exc:
        raise ModelLoadError(f"model {path} is not servable: {exc}") from exc
    if name:
        metadata = dataclasses.replace(metadata, name=name)
    output_names = _check_signature(session, metadata, path)
    in_use = tuple(session.get_providers())
    if device == "cuda" and CUDA not in in_use:
        raise ModelLoadError(
            f"--device cuda: onnxruntime could not start the CUDA provider for {path} "
            f"(session runs on {', '.join(in_use)}); check the CUDA/cuDNN libraries or use --device cpu"
        )
    model = LoadedModel(session=session, metadata=metadata, path=path, sha256=file_sha256(path),
                        providers=in_use, load_seconds=0.0, output_names=output_names, threads=threads)
    _warm_up(model, warmup_batch)
    return dataclasses.replace(model, load_seconds=time.perf_counter() - started)


def _check_signature(session: ort.InferenceSession, metadata: ModelMetadata, path: Path) -> tuple[str, ...]:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != metadata.input_name:
        names = [i.name for i in inputs]
        raise ModelLoadError(f"model {path} must have exactly one input named {metadata.input_name!r}, has {names}")
    shape = list(inputs[0].shape)
    expected = list(metadata.input_shape)
    if inputs[0].type != "tensor(float)" or len(shape) != 4 or [int(d) if isinstance(d, int) else d
                                                                 for d in shape[1:]] != expected:
        raise ModelLoadError(
            f"model {path} input {inputs[0].name!r} must be float32 [N, {', '.join(map(str, expected))}], "
            f"is {inputs[0].type} {shape}"
        )
    if isinstance(shape[0], int) and shape[0] != -1:
        raise ModelLoadError(f"model {path} input needs a dynamic batch dimension, has fixed {shape[0]}")
    outputs = {o.name: o for o in session.get_outputs()}
    classes = len(metadata.labels)
    for name in metadata.output_names:
        if name not in outputs:
            raise ModelLoadError(f"model {path} lacks output {name!r} (has {sorted(outputs)})")
        if outputs[name].shape[-1] != classes:
            raise ModelLoadError(f"model {path} output {name!r} must be [N, {classes}], is {outputs[name].shape}")
    if PROBABILITIES_OUTPUT not in metadata.output_names or len(metadata.output_names) != 2:
        raise ModelLoadError(
            f"model {path} must declare outputs [logits, probabilities], declares {list(metadata.output_names)}"
        )
    logits = next(n for n in metadata.output_names if n != PROBABILITIES_OUTPUT)
    return (logits, PROBABILITIES_OUTPUT)


def _warm_up(model: LoadedModel, batch: int) -> None:
    # The first runs allocate arenas and pick kernels; do it before the server reports SERVING.
    for n in sorted({1, max(1, batch)}):
        sample = np.zeros((n, *model.metadata.input_shape), dtype=np.float32)
        _, probs = model.run(sample)
        if probs.shape != (n, len(model.metadata.labels)) or not np.all(np.isfinite(probs)):
            raise ModelLoadError(f"model {model.path} gave unusable output on warm-up: shape {probs.shape}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
