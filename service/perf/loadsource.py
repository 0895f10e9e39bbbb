"""Where `digits loadtest` gets its images, and how it turns them into ready-to-send requests.

Three sources:

* an IDX folder (``t10k-images-idx3-ubyte[.gz]`` preferred, else ``train-*``; labels from the matching
  ``*-labels-idx1-ubyte[.gz]`` when present),
* a folder of image files (any format Pillow reads, searched recursively; a file's label is the digit
  its name starts with, ``7_0042.png`` / ``7-a.jpg``, or the name of its folder, ``7/0042.png``;
  files with neither are sent unlabelled),
* synthetic scribbles (no folder given): seeded random strokes, no labels.

Requests are serialized once, before the run, so the generator spends its CPU on sending, not on
building protobufs.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service import idx
from service.gen.digits.v1 import digits_pb2
from service.gen.inference import grpc_predict_v2_pb2 as v2

ENCODINGS = ("raw", "png")
NO_LABEL = -1
_LABELLED_NAME = re.compile(r"^(\d)[_-]")


class SourceError(ValueError):
    """The image source cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageSet:
    """Images to send: 2-D uint8 arrays (ink bright on dark) or encoded files, and labels (-1 = unknown)."""

    images: list[np.ndarray | bytes]
    labels: np.ndarray  # int64 [N]
    description: str

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())


@dataclass(frozen=True)
class PreparedRequest:
    """One serialized request and the labels of its images (-1 = unknown)."""

    data: bytes
    labels: np.ndarray
    images: int


def load_images(path: Path | None, synthetic: int = 256, seed: int = 0) -> ImageSet:
    """The images at `path` (IDX folder, image folder or a single image file), or synthetic ones."""
    if path is None:
        return synthetic_images(synthetic, seed)
    if path.is_file():
        return ImageSet([path.read_bytes()], np.array([_label_of(path)], dtype=np.int64), str(path))
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    if idx.find_pair(path) is not None:
        try:
            images, labels = idx.load_digits(path)
        except idx.IdxError as exc:
            raise SourceError(str(exc)) from exc
        known = np.full(len(images), NO_LABEL, dtype=np.int64) if labels is None else labels.astype(np.int64)
        return ImageSet(list(images), known, f"{len(images)} IDX digits from {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SourceError(f"{path}: no IDX files and no image files")
    labels = np.array([_label_of(p) for p in files], dtype=np.int64)
    return ImageSet([p.read_bytes() for p in files], labels, f"{len(files)} image files from {path}")


def synthetic_images(count: int, seed: int = 0) -> ImageSet:
    """`count` 28x28 scribbles (bright strokes on black): realistic sizes, no labels."""
    rng = np.random.default_rng(seed)
    images: list[np.ndarray | bytes] = []
    for _ in range(count):
        canvas = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(canvas)
        points = [tuple(int(v) for v in rng.integers(5, 23, size=2)) for _ in range(int(rng.integers(3, 6)))]
        draw.line(points, fill=255, width=int(rng.integers(2, 4)))
        images.append(np.asarray(canvas))
    return ImageSet(images, np.full(count, NO_LABEL, dtype=np.int64), f"{count} synthetic scribbles")


def to_image(item: np.ndarray | bytes, encoding: str) -> digits_pb2.Image:
    """One source image as a protobuf Image: ``raw`` pixels or a ``png`` file.

    Image files are sent as they are for ``png`` (whatever their format) and decoded to 8-bit
    grayscale on the client for ``raw``.
    """
    if encoding not in ENCODINGS:
        raise SourceError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if isinstance(item, bytes):
        if encoding == "png":
            return digits_pb2.Image(encoded=item)
        try:
            item = np.asarray(Image.open(io.BytesIO(item)).convert("L"))
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot decode an image file for --encoding raw: {exc}") from exc
    if encoding == "png":
        out = io.BytesIO()
        Image.fromarray(item).save(out, format="PNG")
        return digits_pb2.Image(encoded=out.getvalue())
    height, width = item.shape
    return digits_pb2.Image(raw=digits_pb2.RawPixels(width=width, height=height, dtype=digits_pb2.DTYPE_UINT8,
                                                     data=np.ascontiguousarray(item, dtype=np.uint8).tobytes()))


def prepare_requests(images: ImageSet, batch: int, encoding: str, max_requests: int = 512) -> list[PreparedRequest]:
    """Serialized RecognizeRequests of `batch` images each, cycling through the set.

    Enough distinct requests to cover every image once (at most `max_requests`); the run cycles
    through them.
    """
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    count = len(images.images)
    if count == 0:
        raise SourceError("no images to send")
    encoded = [to_image(item, encoding) for item in images.images[:max(batch, min(count, batch * max_requests))]]
    distinct = max(1, min(max_requests, -(-count // batch)))
    prepared = []
    for r in range(distinct):
        picks = [(r * batch + j) % count for j in range(batch)]
        request = digits_pb2.RecognizeRequest(images=[encoded[i % len(encoded)] for i in picks])
        prepared.append(PreparedRequest(request.SerializeToString(), images.labels[[i % len(encoded) for i in picks]],
                                        batch))
    return prepared


def prepare_v2_requests(images: ImageSet, batch: int, model: str = "lenet5",
                        max_requests: int = 512) -> list[PreparedRequest]:
    """Serialized Open Inference Protocol ModelInferRequests: `batch` images as one UINT8 tensor
    [batch, 1, H, W] in raw_input_contents (MNIST-style pixels; the server normalizes them), asking
    for the probabilities only. Every image must have one size (28x28 for the shipped model)."""
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    pixels = []
    for item in images.images[:max(batch, batch * max_requests)]:
        if isinstance(item, bytes):
            try:
                item = np.asarray(Image.open(io.BytesIO(item)).convert("L"))
            except (OSError, ValueError) as exc:
                raise SourceError(f"cannot decode an image file for --protocol v2: {exc}") from exc
        pixels.append(np.ascontiguousarray(item, dtype=np.uint8))
    if len({p.shape for p in pixels}) != 1:
        raise SourceError("--protocol v2 sends tensors: every image must have the same size (use 28x28 digits)")
    stack = np.stack(pixels)
    count, height, width = stack.shape
    prepared = []
    for r in range(max(1, min(max_requests, -(-count // batch)))):
        picks = [(r * batch + j) % count for j in range(batch)]
        request = v2.ModelInferRequest(
            model_name=model,
            inputs=[v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8",
                                                          shape=[batch, 1, height, width])],
            outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            raw_input_contents=[stack[picks].tobytes()])
        prepared.append(PreparedRequest(request.SerializeToString(), images.labels[picks], batch))
    return prepared


def _label_of(path: Path) -> int:
    match = _LABELLED_NAME.match(path.name)
    if match:
        return int(match.group(1))
    if re.fullmatch(r"\d", path.parent.name):
        return int(path.parent.name)
    return NO_LABEL
