"""The protocol-free core: images in, predictions out. Every API (own gRPC, Open Inference Protocol,
REST) is a thin adapter over this class; it owns the current model, the batcher and the limits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.recognition import rejection
from service.recognition.batcher import (
    BatcherClosedError,
    BatchResult,
    DeadlineExpiredError,
    DynamicBatcher,
    QueueFullError,
)
from service.recognition.decode import ImageError, Payload
from service.recognition.decode_pool import DecodePool, DecodeStopped
from service.recognition.ink import inked
from service.recognition.model import LoadedModel, ModelLoadError, load_model
from service.recognition.model_metadata import Rejection
from service.recognition.preprocess import open_batch
from service.recognition.reading.reader import Reader, Reading
from service.recognition.rejection import RejectionOverrides
from service.telemetry.metrics import DIGITS, Metrics

log = logging.getLogger(__name__)

# Requests of at most this many images count their predictions one by one (cheaper than a bincount).
COUNT_ONE_BY_ONE = 4
READING_THREADS = 1


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
    def max_request_pixels(self) -> int: ...
    @property
    def reject_not_a_digit_below(self) -> float | None: ...
    @property
    def reject_uncertain_below(self) -> float | None: ...
    @property
    def reject_filled_above(self) -> float | None: ...
    @property
    def reject_grey_inside_above(self) -> float | None: ...
    @property
    def model_name(self) -> str | None: ...


SHUTTING_DOWN = "server is shutting down; retry elsewhere"


class RecognizeError(Exception):
    """A request cannot be answered. `code` is the gRPC status name the adapters map it to."""

    def __init__(self, code: str, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # True when the same request may well succeed later (a full queue), false when it never will
        # (an image over the pixel limit): HTTP tells them apart as 429 and 413.
        self.retry = retry


@dataclass(frozen=True)
class Recognition:
    """Predictions for one request, in request order, and the model that made them.

    Rows of images with no ink were never run through the model: their logits are 0 and their
    probabilities uniform, and `reasons` says ``no_ink``.
    """

    logits: np.ndarray  # [n, classes]
    probabilities: np.ndarray  # [n, classes]
    model: LoadedModel
    reasons: np.ndarray  # [n] str: "" when accepted, else a rejection.REASONS value

    @functools.cached_property
    def accepted(self) -> np.ndarray:
        return self.reasons == rejection.ACCEPTED

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
        self._draining = False
        self._decoder = DecodePool()
        # One thread for every reading's decoding and segmentation: it is GIL-bound Python, so more threads
        # only contend (paired at c16, 5-digit PNGs: 14.7 readings/s on one thread, 6.6 on asyncio's six;
        # docs/benchmarks.md).
        self._reading = ThreadPoolExecutor(max_workers=READING_THREADS, thread_name_prefix="read")
        self._batcher = DynamicBatcher(lambda: self._model, config.max_batch_size, config.max_batch_delay_s,
                                       config.max_queue, metrics,
                                       strokes_for=lambda model: rejection.tests_strokes(self.rule(model)))
        self._overrides = RejectionOverrides(config.reject_not_a_digit_below, config.reject_uncertain_below,
                                             config.reject_filled_above, config.reject_grey_inside_above)
        self._predicted = tuple(metrics.predictions.labels(digit=digit) for digit in DIGITS)  # bound once
        self._rule = (model, self._overrides.apply(model.metadata.rejection))
        metrics.set_model(model.name, model.version, model.sha256, model.provider, model.load_seconds)

    @property
    def model(self) -> LoadedModel:
        """The model new batches run on (a reload swaps it; batches in flight keep theirs)."""
        return self._model

    @property
    def config(self) -> RecognizerSettings:
        return self._config

    def rule(self, model: LoadedModel) -> Rejection | None:
        """The rejection rule in force for `model`: its metadata's thresholds with the server's overrides."""
        served, rule = self._rule
        return rule if served is model else self._overrides.apply(model.metadata.rejection)

    @property
    def queued_images(self) -> int:
        return self._batcher.queued_images

    def start(self) -> None:
        self._batcher.start()

    async def close(self) -> None:
        """Finish queued work and stop the batcher and the decode threads."""
        await self._batcher.close()
        self._decoder.close()
        self._reading.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE) from now on; those already admitted run to the end, and so
        do the next messages of a stream opened before (the stream itself was admitted)."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self, count: int) -> None:
        """Admit a new request of `count` images, or refuse it: UNAVAILABLE while draining, INVALID_ARGUMENT
        when empty or over --max-images-per-request. Every protocol entry point calls it first."""
        if self._draining:
            raise RecognizeError("UNAVAILABLE", SHUTTING_DOWN)
        self._check_count(count)

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise RecognizeError("INVALID_ARGUMENT", "request has no images; send 1 or more")
        limit = self._config.max_images_per_request
        if count > limit:
            raise RecognizeError(
                "INVALID_ARGUMENT",
                f"request has {count} images; the limit is {limit} per request (--max-images-per-request)")

    async def recognize(self, payloads: Sequence[Payload], deadline: float | None = None) -> Recognition:
        """Recognize encoded images and/or raw pixels. `deadline` is a time.monotonic() value."""
        started = time.perf_counter()
        pixels = await self._decode(payloads, deadline)
        self._metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return await self._submit(pixels, inked(pixels), normalized=False, deadline=deadline)

    async def _decode(self, payloads: Sequence[Payload], deadline: float | None) -> np.ndarray:
        self._check_count(len(payloads))
        meta, config = self._model.metadata, self._config
        try:
            return await self._decoder.pixels(payloads, meta.width, meta.ink_polarity, config.max_image_pixels,
                                              config.max_request_pixels, deadline)
        except ImageError as exc:
            raise RecognizeError(exc.code, f"image {exc.index}: {exc}") from exc
        except DecodeStopped:
            raise RecognizeError("DEADLINE_EXCEEDED", "deadline expired while decoding the images") from None

    async def read(self, payloads: Sequence[Payload], deadline: float | None = None) -> list[Reading]:
        """Read the line of digits in each image (`service.recognition.reading`). Every image's candidate
        crops go to the batcher in one submission, and all images of the request at once, so they batch
        with each other and with other traffic. Limits are those of `recognize`."""
        self._check_count(len(payloads))
        try:  # headers and the request's pixel budget, before anything is decoded
            for item in open_batch(payloads, self._config.max_image_pixels, self._config.max_request_pixels):
                if item.image is not None:
                    item.image.close()
        except ImageError as exc:
            raise RecognizeError(exc.code, f"image {exc.index}: {exc}") from exc
        model = self._model
        rule = self.rule(model)
        classified = [0.0]

        async def classify(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            started = time.perf_counter()
            try:
                result = await self._run(pixels if model.metadata.ink_polarity == "light_on_dark" else 255 - pixels,
                                         normalized=False, deadline=deadline)
            finally:
                classified[0] += time.perf_counter() - started
            return result.logits, result.probabilities

        reader = Reader(classify, executor=self._reading)

        async def one(index: int, payload: Payload) -> Reading:
            try:
                return await reader.read_payload(payload, self._config.max_image_pixels, rule)
            except ImageError as exc:
                raise RecognizeError(exc.code, f"image {index}: {exc}") from exc

        started = time.perf_counter()
        readings = list(await asyncio.gather(*(one(i, p) for i, p in enumerate(payloads))))
        # What the readings cost besides waiting for the model: decoding, segmenting, the recipe.
        self._metrics.segmentation_seconds.observe(max(0.0, time.perf_counter() - started - classified[0]))
        for reading in readings:
            self._metrics.readings.labels(outcome=reading.rejection or "accepted").inc()
            self._metrics.reading_digits.observe(len(reading.digits))
        return readings

    async def recognize_pixels(self, pixels: np.ndarray, deadline: float | None = None) -> Recognition:
        """Recognize [n, H, W] MNIST-convention pixels (uint8 0..255 or float32 0..1) as given."""
        self._check_count(int(pixels.shape[0]))
        return await self._submit(pixels, inked(pixels), normalized=False, deadline=deadline)

    async def infer_normalized(self, tensor: np.ndarray, deadline: float | None = None, *,
                               finite: bool = False) -> Recognition:
        """Run an already-normalized [n, 1, H, W] float32 tensor (the model's own input space). NaN or
        infinity is refused, unless the caller says (`finite`) that it has checked every value already."""
        self._check_count(int(tensor.shape[0]))
        if not finite and not np.isfinite(tensor).all():
            raise RecognizeError("INVALID_ARGUMENT", "input tensor contains NaN or infinity")
        norm = self._model.metadata.normalization
        # Back to pixel/255 for the no-ink test: x * std + mean = pixel * scale, and scale is 1/255.
        pixels = tensor[:, 0] * np.float32(norm.std) + np.float32(norm.mean)
        return await self._submit(tensor, inked(pixels), normalized=True, deadline=deadline)

    async def _submit(self, pixels: np.ndarray, has_ink: np.ndarray, normalized: bool,
                      deadline: float | None) -> Recognition:
        # Images with no ink never reach the model; when every image has ink (the usual case) the
        # request's array goes to the batcher as it is, without a copy.
        blank = not has_ink.all()
        result = await self._run(pixels[has_ink] if blank else pixels, normalized, deadline) \
            if has_ink.any() else None
        model = result.model if result is not None else self._model
        shapes = result.shapes if result is not None else None
        if blank:
            classes = len(model.metadata.labels)
            logits = np.zeros((len(pixels), classes), dtype=np.float32)
            probabilities = np.full((len(pixels), classes), 1.0 / classes, dtype=np.float32)
            if result is not None:
                logits[has_ink], probabilities[has_ink] = result.logits, result.probabilities
            if shapes is not None:
                inked_shapes, shapes = shapes, np.zeros((len(pixels), shapes.shape[1]))
                shapes[has_ink] = inked_shapes
        else:
            assert result is not None
            logits, probabilities = result.logits, result.probabilities
        reasons = rejection.decide(self.rule(model), logits, probabilities, has_ink, shapes)
        recognition = Recognition(logits, probabilities, model, reasons)
        self._count_predictions(recognition)
        return recognition

    async def _run(self, pixels: np.ndarray, normalized: bool, deadline: float | None) -> BatchResult:
        try:
            result: BatchResult = await self._batcher.submit(pixels, normalized=normalized, deadline=deadline)
        except QueueFullError as exc:
            raise RecognizeError("RESOURCE_EXHAUSTED", str(exc), retry=True) from exc
        except DeadlineExpiredError as exc:
            raise RecognizeError("DEADLINE_EXCEEDED", str(exc)) from exc
        except BatcherClosedError as exc:
            raise RecognizeError("UNAVAILABLE", str(exc)) from exc
        except Exception as exc:  # session.run failed; the batcher logged the traceback
            # A RecognizeError, not a bare exception: the caller gets INTERNAL and the metrics agree,
            # instead of gRPC's UNKNOWN for an unhandled handler exception.
            raise RecognizeError("INTERNAL",
                                 f"inference failed ({type(exc).__name__}); see the server log") from exc
        # The batcher checked the whole batch on its thread; only a batch with a bad row is looked at here.
        if not result.finite and not (np.isfinite(result.logits).all() and np.isfinite(result.probabilities).all()):
            raise _not_finite(result.model, normalized)
        return result

    def _count_predictions(self, recognition: Recognition) -> None:
        accepted = recognition.accepted
        by_digit = self._predicted
        if accepted.all() and len(accepted) <= COUNT_ONE_BY_ONE:  # a few images: no bincount
            for digit in recognition.digits.tolist():
                by_digit[digit].inc()
            return
        counts = np.bincount(recognition.digits[accepted], minlength=len(DIGITS))
        for digit in np.flatnonzero(counts):
            by_digit[digit].inc(int(counts[digit]))
        if not accepted.all():
            for reason in rejection.REASONS:
                count = int((recognition.reasons == reason).sum())
                if count:
                    self._metrics.rejected_predictions.labels(reason=reason).inc(count)

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
            self._rule = (new, self._overrides.apply(new.metadata.rejection))
            if new.metadata.rejection is None:
                log.warning("model %s %s carries no rejection thresholds: every image with ink is accepted "
                            "(retrain and export it to get not_a_digit and uncertain)", new.name, new.version)
            self._metrics.set_model(new.name, new.version, new.sha256, new.provider, new.load_seconds)
            self._metrics.model_reloads.labels(result="success").inc()
            log.info("model reloaded: %s %s -> %s %s (sha256 %s)", old.name, old.version, new.name,
                     new.version, new.sha256[:12])
            return new

