"""The protocol-free core: images in, predictions out. Every API (own gRPC, Open Inference Protocol,
REST) is a thin adapter over this class; it owns the current model, the batcher and the limits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.recognition.batcher import (
    BatcherClosedError,
    BatchResult,
    DeadlineExpiredError,
    DynamicBatcher,
    QueueFullError,
)
from service.recognition.model import LoadedModel, ModelLoadError, load_model
from service.recognition.preprocess import ImageError, Payload, to_pixel_batch
from service.telemetry.metrics import DIGITS, Metrics

log = logging.getLogger(__name__)

# Encoded payloads above this size are decoded on a worker thread so that one large photo does not
# stall every other request on the event loop; small ones (the common case) are cheaper inline.
INLINE_DECODE_BYTES = 256 * 1024


class RecognizerSettings(Protocol):
    """What the core reads from the server's configuration (`service.server.config.ServerConfig`
    satisfies it); a Protocol so that the core never imports the server."""

    # Read-only: ServerConfig is frozen, and max_batch_delay_s is a derived property there.
    @property
    def device(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_batch_delay_s(self) -> float: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def max_images_per_request(self) -> int: ...
    @property
    def max_image_pixels(self) -> int: ...
    @property
    def low_confidence(self) -> float: ...
    @property
    def model_name(self) -> str | None: ...


class RecognizeError(Exception):
    """A request cannot be answered. `code` is the gRPC status name the adapters map it to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Recognition:
    """Predictions for one request, in request order, and the model that made them."""

    logits: np.ndarray  # [n, classes]
    probabilities: np.ndarray  # [n, classes]
    model: LoadedModel

    # Computed once per request: the metrics and the reply both need them.
    @functools.cached_property
    def digits(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @functools.cached_property
    def confidences(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


def _not_finite(model: LoadedModel, normalized: bool) -> RecognizeError:
    """NaN or infinite output. Pixels (0..255 or 0..1) cannot cause it, so then the model is broken;
    an already-normalized tensor can: finite values far outside what the model was trained on
    overflow float32 inside it. That is the client's input, and the rows of other requests in the
    same batch are unaffected."""
    if not normalized:
        return RecognizeError("INTERNAL", f"model {model.name} {model.version} gave NaN or infinite output")
    norm = model.metadata.normalization
    low, high = -norm.mean / norm.std, (255 * norm.scale - norm.mean) / norm.std
    return RecognizeError(
        "INVALID_ARGUMENT",
        f"the model's output is NaN or infinite for this input: normalized inputs should lie in about "
        f"[{low:.4f}, {high:.4f}] ((pixel/255 - {norm.mean}) / {norm.std})")


class Recognizer:
    """Owns the served model and the batcher; validates, preprocesses and recognizes."""

    def __init__(self, model: LoadedModel, config: RecognizerSettings, metrics: Metrics) -> None:
        self._model = model
        self._config = config
        self._metrics = metrics
        self._reload_lock = asyncio.Lock()
        self._batcher = DynamicBatcher(lambda: self._model, config.max_batch_size, config.max_batch_delay_s,
                                       config.max_queue, metrics)
        metrics.set_model(model.name, model.version, model.sha256, model.provider, model.load_seconds)

    @property
    def model(self) -> LoadedModel:
        """The model new batches run on (a reload swaps it; batches in flight keep theirs)."""
        return self._model

    @property
    def config(self) -> RecognizerSettings:
        return self._config

    @property
    def queued_images(self) -> int:
        return self._batcher.queued_images

    def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        """Finish queued work and stop the batcher."""
        await self._batcher.close()

    def check_count(self, count: int) -> None:
        """Reject an empty request or one with too many images (INVALID_ARGUMENT)."""
        if count == 0:
            raise RecognizeError("INVALID_ARGUMENT", "request has no images; send 1 or more")
        limit = self._config.max_images_per_request
        if count > limit:
            raise RecognizeError(
                "INVALID_ARGUMENT",
                f"request has {count} images; the limit is {limit} per request (--max-images-per-request)")

    def preprocess(self, payloads: Sequence[Payload]) -> np.ndarray:
        """Validate and turn payloads into one [n, H, W] MNIST-convention array.

        Raises RecognizeError naming the first bad image by its index.
        """
        self.check_count(len(payloads))
        meta = self._model.metadata
        try:
            return to_pixel_batch(payloads, side=meta.width, max_pixels=self._config.max_image_pixels,
                                  ink_polarity=meta.ink_polarity)
        except ImageError as exc:
            raise RecognizeError(exc.code, f"image {exc.index}: {exc}") from exc

    async def recognize(self, payloads: Sequence[Payload], deadline: float | None = None) -> Recognition:
        """Recognize encoded images and/or raw pixels. `deadline` is a time.monotonic() value."""
        started = time.perf_counter()
        if sum(len(p) for p in payloads if isinstance(p, bytes)) > INLINE_DECODE_BYTES:
            pixels = await asyncio.to_thread(self.preprocess, payloads)
        else:
            pixels = self.preprocess(payloads)
        self._metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return await self._submit(pixels, normalized=False, deadline=deadline)

    async def recognize_pixels(self, pixels: np.ndarray, deadline: float | None = None) -> Recognition:
        """Recognize [n, H, W] MNIST-convention pixels (uint8 0..255 or float32 0..1) as given."""
        self.check_count(int(pixels.shape[0]))
        return await self._submit(pixels, normalized=False, deadline=deadline)

    async def infer_normalized(self, tensor: np.ndarray, deadline: float | None = None) -> Recognition:
        """Run an already-normalized [n, 1, H, W] float32 tensor (the model's own input space)."""
        self.check_count(int(tensor.shape[0]))
        if not np.isfinite(tensor).all():
            raise RecognizeError("INVALID_ARGUMENT", "input tensor contains NaN or infinity")
        return await self._submit(tensor, normalized=True, deadline=deadline)

    async def _submit(self, pixels: np.ndarray, normalized: bool, deadline: float | None) -> Recognition:
        try:
            result: BatchResult = await self._batcher.submit(pixels, normalized=normalized, deadline=deadline)
        except QueueFullError as exc:
            raise RecognizeError("RESOURCE_EXHAUSTED", str(exc)) from exc
        except DeadlineExpiredError as exc:
            raise RecognizeError("DEADLINE_EXCEEDED", str(exc)) from exc
        except BatcherClosedError as exc:
            raise RecognizeError("UNAVAILABLE", str(exc)) from exc
        except Exception as exc:  # session.run failed; the batcher logged the traceback
            # A RecognizeError, not a bare exception: the caller gets INTERNAL and the metrics agree,
            # instead of gRPC's UNKNOWN for an unhandled handler exception.
            raise RecognizeError("INTERNAL",
                                 f"inference failed ({type(exc).__name__}); see the server log") from exc
        if not (np.isfinite(result.logits).all() and np.isfinite(result.probabilities).all()):
            raise _not_finite(result.model, normalized)
        recognition = Recognition(result.logits, result.probabilities, result.model)
        self._count_predictions(recognition)
        return recognition

    def _count_predictions(self, recognition: Recognition) -> None:
        counts = np.bincount(recognition.digits, minlength=len(DIGITS))
        for digit in np.flatnonzero(counts):
            self._metrics.predictions.labels(digit=DIGITS[digit]).inc(int(counts[digit]))
        low = int((recognition.confidences < self._config.low_confidence).sum())
        if low:
            self._metrics.low_confidence.inc(low)

    async def reload(self, path: Path | None = None) -> LoadedModel:
        """Load, validate and warm up a model, then swap it in atomically.

        Batches already running finish on the old model. A model that fails to load, or whose input
        or labels differ from the current one, is refused (ModelLoadError) and the old one keeps serving.
        """
        async with self._reload_lock:
            target = Path(path) if path is not None else self._model.path
            try:
                new = await asyncio.to_thread(load_model, target, self._config.device, self._config.threads,
                                              self._config.max_batch_size, name=self._config.model_name)
                old = self._model
                # Requests preprocessed for the old model (size, ink polarity) may run on the new one
                # during the swap, so those must match as well as the labels.
                if (new.metadata.input_shape != old.metadata.input_shape
                        or new.metadata.labels != old.metadata.labels
                        or new.metadata.ink_polarity != old.metadata.ink_polarity):
                    raise ModelLoadError(
                        f"model {target} is incompatible with the one being served: input "
                        f"{list(new.metadata.input_shape)} labels {len(new.metadata.labels)} "
                        f"{new.metadata.ink_polarity} vs {list(old.metadata.input_shape)} labels "
                        f"{len(old.metadata.labels)} {old.metadata.ink_polarity}")
            except Exception as exc:  # ModelLoadError, or onnxruntime's own error from a failing warm-up run
                error = exc if isinstance(exc, ModelLoadError) else ModelLoadError(
                    f"cannot load model {target}: {type(exc).__name__}: "
                    f"{(str(exc).strip().splitlines() or [''])[0][:300]}")
                self._metrics.model_reloads.labels(result="failed").inc()
                log.error("model reload refused, still serving %s %s: %s", self._model.name,
                          self._model.version, error)
                if error is exc:
                    raise
                raise error from exc
            self._model = new
            self._metrics.set_model(new.name, new.version, new.sha256, new.provider, new.load_seconds)
            self._metrics.model_reloads.labels(result="success").inc()
            log.info("model reloaded: %s %s -> %s %s (sha256 %s)", old.name, old.version, new.name,
                     new.version, new.sha256[:12])
            return new

