"""Checkpoint -> self-contained ONNX model with the serving metadata, verified, plus its model card.

The graph's `probabilities` are ``softmax(logits / T)`` with the temperature T the checkpoint carries
(fitted on held-out digits by `digits train`); its rejection rule goes into the metadata as it is.
The steps are separate functions so that variants slot in without touching the others
(`training.quantize` adds int8 quantization after `write_onnx`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.recognition.model_metadata import (
    INPUT_NAME,
    LOGITS_OUTPUT,
    PROBABILITIES_OUTPUT,
    Calibration,
    ModelMetadata,
    Normalization,
    Rejection,
)
from service.recognition.preprocess import normalize
from training.model import ExportModule, LeNet5, count_parameters, lenet5
from training.train import load_checkpoint

MODEL_NAME = "lenet5"
DEFAULT_VERSION = "1.0.0"
OPSET = 18  # the torch.export-based exporter's native opset
PARITY_TOLERANCE = 1e-5
LABELS = tuple(str(digit) for digit in range(10))


class ExportError(RuntimeError):
    """The exported model is invalid or does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ExportResult:
    """The written model, its card and the verification figure."""

    path: Path
    card_path: Path
    sha256: str
    metadata: ModelMetadata
    parity_max_diff: float


MODEL_CODE = ("training", "service")
"""The folders whose code makes a model (recipe, generators, the server's recipe it trains through)."""


def _git(where: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit(where: Path | None = None) -> str:
    """The commit of the checkout `where` (default: this code's) is in, or "unknown" (no git, no commits,
    not a checkout). "-dirty" is appended when the model-making code (MODEL_CODE) has uncommitted
    changes: then the commit alone does not say what trained the model."""
    folder = where or Path(__file__).resolve().parent
    done = _git(folder, "rev-parse", "HEAD")
    commit = done.stdout.strip() if done is not None and done.returncode == 0 else ""
    if not commit:
        return "unknown"
    # ":/" roots each pathspec at the top of the checkout, wherever `folder` is inside it.
    status = _git(folder, "status", "--porcelain", "--untracked-files=no", "--", *(f":/{p}" for p in MODEL_CODE))
    return f"{commit}-dirty" if status is None or status.stdout.strip() else commit


def build_metadata(checkpoint: Mapping[str, Any], version: str, command: str, opset: int = OPSET) -> ModelMetadata:
    """The serving contract plus provenance, from what the checkpoint recorded about its run."""
    norm = checkpoint["normalization"]
    data = checkpoint["data"]
    config = checkpoint["config"]
    test_acc = checkpoint.get("test_accuracy")
    extra = {
        "training_data": data["training_data"],
        "training_data_sha256": json.dumps(data["training_data_sha256"], sort_keys=True),
        "validation_split": data["validation_split"],
        "test_split": data["test_split"],
        "val_accuracy": f"{float(checkpoint['best_val_acc']):.4f}",
        "test_accuracy": "not measured" if test_acc is None else f"{float(test_acc):.4f}",
        "training_commit": git_commit(),
        "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "torch_version": str(checkpoint.get("torch_version", torch.__version__)),
        "onnx_version": onnx.__version__,
        "opset": str(opset),
        "params": str(count_parameters(LeNet5())),
        "seed": str(checkpoint["seed"]),
        "epochs": str(checkpoint["epoch"]),
        "best_epoch": str(checkpoint["best_epoch"]),
        "augmentation": "on" if config.get("augment") else "off",
        "lr_schedule": str(config.get("lr_schedule")),
        "recipe": json.dumps({k: v for k, v in config.items() if k not in _NOT_RECIPE}, sort_keys=True),
        "command": command,
        **{str(k): str(v) for k, v in checkpoint.get("figures", {}).items()},
    }
    return ModelMetadata(
        name=MODEL_NAME,
        version=version,
        normalization=Normalization(scale=norm["scale"], mean=norm["mean"], std=norm["std"]),
        labels=LABELS,
        rejection=Rejection.from_json(checkpoint["rejection"]) if checkpoint.get("rejection") else None,
        calibration=Calibration.from_json(checkpoint["calibration"]) if checkpoint.get("calibration") else None,
        extra=extra,
    )


# Run bookkeeping, not recipe: left out of the metadata's `recipe` (paths would make it machine-specific).
_NOT_RECIPE = {"data_dir", "out_dir", "resume", "threads", "command", "progress"}


def write_onnx(model: torch.nn.Module, path: Path, props: Mapping[str, str], opset: int = OPSET,
               temperature: float = 1.0) -> None:
    """Export `model` (+softmax of logits / temperature) with a dynamic batch, attach `props`, check it and
    save it as ONE file."""
    wrapper = ExportModule(model, temperature).eval()
    example = torch.zeros(2, 1, 28, 28)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" chatter is not our problem
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,  # in memory: the exporter would otherwise write weights to a side *.onnx.data file
                input_names=[INPUT_NAME],
                output_names=[LOGITS_OUTPUT, PROBABILITIES_OUTPUT],
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    proto.doc_string = "LeNet-5 handwritten-digit classifier; see metadata_props for the input contract."
    del proto.metadata_props[:]
    for key, value in sorted(props.items()):
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path, save_as_external_data=False)
    external = [t.name for t in onnx.load(path).graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: weights stored outside the file: {external}")


def check_parity(expected: np.ndarray, actual: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |expected - actual|; raises `ExportError` when shapes differ or it exceeds `tolerance`."""
    if expected.shape != actual.shape:
        raise ExportError(f"parity: shape {actual.shape} differs from PyTorch's {expected.shape}")
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    if not worst <= tolerance:  # also catches NaN
        row = int(np.unravel_index(np.nanargmax(diff), diff.shape)[0]) if diff.size else -1
        raise ExportError(
            f"parity: onnxruntime differs from PyTorch by {worst:.3g} (tolerance {tolerance:g}) on digit {row}"
        )
    return worst


def verify_parity(model: torch.nn.Module, path: Path, pixels: np.ndarray, temperature: float = 1.0) -> float:
    """Run real digits through PyTorch and through onnxruntime (with the file's own metadata) and compare."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
    inputs = normalize(pixels, metadata.normalization)
    logits, probabilities = session.run([LOGITS_OUTPUT, PROBABILITIES_OUTPUT], {metadata.input_name: inputs})
    with torch.no_grad():
        ref_logits, ref_probabilities = ExportModule(model, temperature).eval()(torch.from_numpy(inputs))
    check_parity(ref_logits.numpy(), logits, tolerance=1e-4)  # logits are unbounded: looser absolute bound
    return check_parity(ref_probabilities.numpy(), probabilities)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_card(
    path: Path, metadata: ModelMetadata, parity_max_diff: float, parity_count: int
) -> tuple[Path, str]:
    """`<model>.json` beside the model: metadata, file hash, accuracy figures, reproducing command."""
    digest = sha256_file(path)
    extra = dict(metadata.extra)
    card = {
        "model": path.name,
        "sha256": digest,
        "size_bytes": path.stat().st_size,
        "name": metadata.name,
        "version": metadata.version,
        "accuracy": {
            "validation": extra.get("val_accuracy"),
            "validation_split": extra.get("validation_split"),
            "test": extra.get("test_accuracy"),
            "test_wilson95": json.loads(extra["test_accuracy_wilson95"]) if "test_accuracy_wilson95" in extra else None,
            "test_split": extra.get("test_split"),
            "cross_validated": extra.get("cv_accuracy"),
        },
        "calibration": json.loads(metadata.calibration.to_json()) if metadata.calibration else None,
        "rejection": json.loads(metadata.rejection.to_json()) if metadata.rejection else None,
        "parity": {
            "digits": parity_count,
            "max_abs_diff_probabilities": parity_max_diff,
            "tolerance": PARITY_TOLERANCE,
        },
        "reproduce": extra.get("command"),
        "metadata": metadata.to_props(),
    }
    card_path = path.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    return card_path, digest


def export_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    version: str = DEFAULT_VERSION,
    command: str = "unknown",
    parity_pixels: np.ndarray | None = None,
    opset: int = OPSET,
) -> ExportResult:
    """Export a `digits train` checkpoint to `out`, verify it on real digits and write the model card.

    `parity_pixels` (uint8 [N, 28, 28]) default to the 256 real digits stored in the checkpoint.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    model = lenet5(bool(checkpoint["config"].get("deskew", False)))
    model.load_state_dict(checkpoint["model_state"])
    model.eval()
    out = Path(out)
    metadata = build_metadata(checkpoint, version, command, opset)
    temperature = metadata.calibration.temperature if metadata.calibration is not None else 1.0
    write_onnx(model, out, metadata.to_props(), opset, temperature)
    if parity_pixels is None:
        parity_pixels = checkpoint["parity_images"].numpy()
    assert parity_pixels is not None
    try:
        diff = verify_parity(model, out, parity_pixels, temperature)
    except ExportError:
        out.unlink(missing_ok=True)  # never leave a model behind that failed verification
        raise
    card_path, digest = write_model_card(out, metadata, diff, len(parity_pixels))
    return ExportResult(out, card_path, digest, metadata, diff)
