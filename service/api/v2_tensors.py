"""The Open Inference Protocol (KServe v2) tensor rules, shared by its gRPC and REST adapters.

Protocol-free: the adapters hand over a tensor's name, datatype, shape and either raw bytes or a list of
values, and get back a validated numpy array (or a RecognizeError naming the problem); on the way out
they get the requested output tensors as arrays. The model is described from its own metadata:

  input   image          FP32  [-1, 1, H, W]  normalized, the model's own input space
                         UINT8 [-1, 1, H, W]  raw MNIST-convention pixels 0..255, normalized by the server
  outputs logits         FP32  [-1, classes]
          probabilities  FP32  [-1, classes]   calibrated
          accepted       BOOL  [-1]            when requested: the rejection rule's verdict per image
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.recognition.model import LoadedModel
from service.recognition.model_metadata import ModelMetadata
from service.recognition.recognizer import Recognition, RecognizeError, Recognizer
from service.telemetry.logs import short

# Little-endian on the wire, as the specification requires for raw contents.
DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
OUTPUT_DATATYPE = "FP32"
# Not an output of the ONNX graph: the server's verdict (service.recognition.rejection), returned only
# when a request names it, so that clients written for the model's own outputs see no change.
ACCEPTED_OUTPUT = "accepted"
ACCEPTED_DATATYPE = "BOOL"
PLATFORM = "onnxruntime_onnx"
# Tensors given as more values than this (JSON lists, protobuf typed contents) are parsed off the event
# loop: converting them takes tens of ms per million values, which would stall every other call.
INLINE_VALUES = 64 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as model metadata describes it; -1 marks the variable batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class InputTensor:
    """A validated input: FP32 arrives [n, 1, H, W] normalized, UINT8 as [n, H, W] raw pixels."""

    array: np.ndarray
    normalized: bool

    @property
    def count(self) -> int:
        return int(self.array.shape[0])


def model_inputs(meta: ModelMetadata) -> list[TensorSpec]:
    """The input the metadata endpoints advertise (UINT8 is accepted too, under the same name)."""
    return [TensorSpec(meta.input_name, "FP32", (-1, *meta.input_shape))]


def model_outputs(model: LoadedModel) -> list[TensorSpec]:
    """The outputs, in the order the model produces them, then `accepted`."""
    return [*(TensorSpec(name, OUTPUT_DATATYPE, (-1, len(model.metadata.labels))) for name in model.output_names),
            TensorSpec(ACCEPTED_OUTPUT, ACCEPTED_DATATYPE, (-1,))]


def typed_values(contents: Any) -> int:
    """How many values a protobuf InferTensorContents carries, in all of its typed fields."""
    return sum(len(values) for _, values in contents.ListFields())


def check_model(model: LoadedModel, name: str, version: str) -> None:
    """NOT_FOUND unless `name` is the served model and `version` is empty or its version."""
    if name != model.name:
        raise RecognizeError("NOT_FOUND", f"unknown model {short(name)}; this server serves {model.name!r}")
    if version not in ("", model.version):
        raise RecognizeError("NOT_FOUND", f"model {short(name)} has no version {short(version)}; "
                                          f"the served version is {model.version!r}")


def check_input_names(names: Sequence[str], meta: ModelMetadata) -> None:
    """Exactly one input, named as the model's input."""
    if len(names) != 1:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"request has {len(names)} input tensors; model takes exactly one, {meta.input_name!r}")
    if names[0] != meta.input_name:
        raise RecognizeError(
            "INVALID_ARGUMENT", f"unknown input {short(names[0])}; the model's input is {meta.input_name!r}")


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} has datatype {short(datatype)}; send FP32 (normalized, the model's input space) "
            "or UINT8 (raw pixels 0..255, ink bright on dark)")
    return dtype


def parse_shape(name: str, shape: Sequence[Any], meta: ModelMetadata) -> tuple[int, ...]:
    """The shape must be [n, 1, H, W] with the model's channels, height and width."""
    # bool is an int subclass; JSON `true` is not a dimension.
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in shape):
        raise RecognizeError("INVALID_ARGUMENT", f"input {short(name)} shape {short(list(shape))} must be integers")
    dims = tuple(int(d) for d in shape)
    expected = (-1, *meta.input_shape)
    if len(dims) == len(expected) and dims[0] < 0:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} has batch dimension {dims[0]}: a request says how many images it sends "
            f"(-1 is only how metadata marks the dimension as variable)")
    if len(dims) != len(expected) or dims[1:] != expected[1:]:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} has shape {short(list(dims))}; expected {list(expected)} (n images of "
            f"{'x'.join(map(str, meta.input_shape))})")
    return dims


def _finish(name: str, datatype: str, flat: np.ndarray, dims: tuple[int, ...]) -> InputTensor:
    if datatype == "UINT8":
        return InputTensor(flat.reshape(dims[0], dims[2], dims[3]), normalized=False)
    tensor = flat.reshape(dims)
    if not np.isfinite(tensor).all():
        raise RecognizeError("INVALID_ARGUMENT", f"input {short(name)} contains NaN or infinity")
    return InputTensor(tensor, normalized=True)


def from_raw(name: str, datatype: str, shape: Sequence[Any], data: bytes,
             meta: ModelMetadata) -> InputTensor:
    """An input given as raw little-endian row-major bytes (gRPC raw_input_contents, REST binary data)."""
    dtype = _dtype(name, datatype)
    dims = parse_shape(name, shape, meta)
    count = math.prod(dims)  # Python ints: a hostile shape cannot overflow
    if len(data) != count * dtype.itemsize:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} has {len(data)} bytes of raw contents; shape {list(dims)} of {datatype} "
            f"needs {count * dtype.itemsize}")
    return _finish(name, datatype, np.frombuffer(data, dtype=dtype), dims)


def from_values(name: str, datatype: str, shape: Sequence[Any], values: Any,
                meta: ModelMetadata, flat_count: int | None = None) -> InputTensor:
    """An input given as values (gRPC typed contents, REST JSON `data`: flat or nested lists).

    `flat_count`, when the caller knows it (a protobuf repeated field's length), is checked against
    the shape before any value is converted: converting holds the GIL, so millions of values sent for
    a shape that needs 784 are refused at once instead of stalling the event loop first."""
    dtype = _dtype(name, datatype)
    dims = parse_shape(name, shape, meta)
    count = math.prod(dims)  # Python ints: a hostile shape cannot overflow
    if flat_count is not None and flat_count != count:
        raise RecognizeError(
            "INVALID_ARGUMENT", f"input {short(name)} has {flat_count} values; shape {list(dims)} needs {count}")
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, RecursionError) as exc:
        raise RecognizeError(
            "INVALID_ARGUMENT", f"input {short(name)} data must be a (nested) list of numbers") from exc
    # Numbers only: numpy would turn "5" into 5.0 and true into 1.0 if asked for floats straight away.
    if array.size and array.dtype.kind not in "iuf":
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} data must be numbers, not {'booleans' if array.dtype.kind == 'b' else 'strings'}"
            if array.dtype.kind in "bUS" else f"input {short(name)} data must be a (nested) list of numbers")
    flat = array.astype(np.float64, copy=False).reshape(-1)
    if flat.size != count:
        raise RecognizeError(
            "INVALID_ARGUMENT",
            f"input {short(name)} has {flat.size} values; shape {list(dims)} needs {count}")
    if datatype == "UINT8" and flat.size and (
            flat.min() < 0 or flat.max() > 255 or not np.array_equal(flat, np.round(flat))):
        raise RecognizeError("INVALID_ARGUMENT", f"input {short(name)} is UINT8: values must be integers 0..255")
    return _finish(name, datatype, flat.astype(dtype), dims)


async def recognize(recognizer: Recognizer, tensor: InputTensor, deadline: float | None) -> Recognition:
    """Run a validated input through the shared core (same batcher, limits and metrics as Recognize)."""
    if tensor.normalized:  # _finish has refused NaN and infinity
        return await recognizer.infer_normalized(tensor.array, deadline, finite=True)
    return await recognizer.recognize_pixels(tensor.array, deadline)


def select_outputs(requested: Sequence[str], model: LoadedModel) -> list[str]:
    """The outputs to return: those requested, in request order, or the model's own outputs."""
    if not requested:
        return list(model.output_names)
    known = (*model.output_names, ACCEPTED_OUTPUT)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise RecognizeError(
            "INVALID_ARGUMENT", f"unknown output {short(unknown[0])}; the outputs are {', '.join(known)}")
    return list(requested)


def output_arrays(recognition: Recognition, names: Sequence[str]) -> list[tuple[TensorSpec, np.ndarray]]:
    """Each requested output as (its spec with the real batch size, a little-endian FP32 array)."""
    by_name = dict(zip(recognition.model.output_names, (recognition.logits, recognition.probabilities),
                       strict=True))
    outputs = []
    for name in names:
        if name == ACCEPTED_OUTPUT:
            # BOOL on the wire is one byte per element, 0 or 1: numpy's bool_ layout.
            verdict = np.ascontiguousarray(recognition.accepted, dtype=np.bool_)
            outputs.append((TensorSpec(name, ACCEPTED_DATATYPE, tuple(verdict.shape)), verdict))
            continue
        array = np.ascontiguousarray(by_name[name], dtype=DATATYPES[OUTPUT_DATATYPE])
        outputs.append((TensorSpec(name, OUTPUT_DATATYPE, tuple(array.shape)), array))
    return outputs
