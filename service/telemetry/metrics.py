"""Every Prometheus metric the server exports, defined once.

Names follow Prometheus conventions: one `digits_` prefix, base units (seconds), `_total` on counters.
Each server owns its registry (tests run several servers in one process); `/metrics` serves it
together with the default process, platform and GC collectors.
"""

from __future__ import annotations

import onnxruntime
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from service import __version__

# prometheus-client would export a `_created` timestamp series next to every counter and histogram
# series, doubling what Prometheus stores for no dashboard or alert we have; Triton and MLServer don't.
disable_created_metrics()

# Sub-millisecond resolution at the bottom (a LeNet-5 batch runs in tens of microseconds), seconds on top.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The event loop's lag: a healthy loop is late by well under a millisecond; 50 ms is a visible stall.
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DIGITS = tuple(str(d) for d in range(10))
# Series that exist from the first scrape, so that rate() sees their first increment and the
# "no successful requests" alert has an OK series to look at before any traffic arrives.
GRPC_RPCS = ("Recognize", "RecognizeStream", "Read", "ReadStream")
# service.recognition.rejection.REASONS, repeated because telemetry sits below every other room.
REJECTION_REASONS = ("no_ink", "not_a_digit", "uncertain")



class Metrics:
    """The server's metrics on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_collectors:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "digits_requests", "Requests answered, by RPC (or HTTP route) and gRPC status code.",
            ["rpc", "code"], registry=r)
        self.images = Counter(
            "digits_images_received", "Images received, by RPC.", ["rpc"], registry=r)
        self.request_seconds = Histogram(
            "digits_request_duration_seconds", "Whole-request latency as the server sees it, by RPC.",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_seconds = Histogram(
            "digits_preprocess_duration_seconds", "Decoding and MNIST preprocessing time per request.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "digits_queue_wait_seconds", "Time a request waited in the batch queue before its batch ran.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "digits_inference_duration_seconds", "session.run time per batch (normalization included).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "digits_batch_size", "Images per session.run.", buckets=BATCH_BUCKETS, registry=r)
        self.last_inference = Gauge(
            "digits_last_inference_timestamp_seconds", "When the last batch ran (Unix time; 0 before the first).",
            registry=r)
        self.queue_depth = Gauge(
            "digits_queue_depth", "Images waiting in the batch queue.", registry=r)
        self.queue_capacity = Gauge(
            "digits_queue_capacity", "Most images the batch queue holds (--max-queue).", registry=r)
        self.inflight = Gauge(
            "digits_inflight_requests", "Requests being processed.", registry=r)
        # Kept as a plain count by the request trackers (on the event loop) and read when scraped: a
        # locked gauge's inc and dec on every request cost more than the count itself.
        self.inflight_requests = 0
        self.inflight.set_function(lambda: self.inflight_requests)
        self.rejected = Counter(
            "digits_rejected_requests", "Requests refused before inference, by reason.",
            ["reason"], registry=r)
        self.predictions = Counter(
            "digits_predictions", "Accepted predictions, by predicted digit.", ["digit"], registry=r)
        self.rejected_predictions = Counter(
            "digits_rejected_predictions",
            "Predictions not accepted, by reason: no_ink, not_a_digit, uncertain (a drift signal).",
            ["reason"], registry=r)
        self.readings = Counter(
            "digits_readings", "Images read as numbers (Read), by outcome: accepted, or the rejection reason.",
            ["outcome"], registry=r)
        self.reading_digits = Histogram(
            "digits_reading_digits", "Digits per reading (0 for an image with no ink or nothing read).",
            buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20), registry=r)
        self.segmentation_seconds = Histogram(
            "digits_segmentation_duration_seconds",
            "Time a Read request spent decoding, segmenting and preparing its crops (model time excluded).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.loop_lag_seconds = Histogram(
            "digits_event_loop_lag_seconds",
            "How much later than asked the event loop woke a 10 ms ticker: what every call on it waited.",
            buckets=LAG_BUCKETS, registry=r)
        self.model_info = Gauge(
            "digits_model_info", "The model being served (value 1), with its identity as labels.",
            ["name", "version", "sha256", "provider"], registry=r)
        self.model_load_seconds = Gauge(
            "digits_model_load_duration_seconds", "Time the current model took to load and warm up.",
            registry=r)
        self.model_reloads = Counter(
            "digits_model_reloads", "Model reload attempts, by result.", ["result"], registry=r)
        # --auth-token-file (service/server/auth.py): refusals by protocol (grpc, http) and reason (missing,
        # malformed, wrong); never anything of the token itself.
        self.auth_refusals = Counter(
            "digits_auth_refusals", "Calls refused for want of an accepted bearer token, by protocol and reason.",
            ["protocol", "reason"], registry=r)
        self.auth_tokens = Gauge(
            "digits_auth_tokens", "Bearer tokens accepted (--auth-token-file); 0 when authentication is off.",
            registry=r)
        self.auth_token_reloads = Counter(
            "digits_auth_token_reloads", "Token file reloads, by result.", ["result"], registry=r)
        self.build_info = Gauge(
            "digits_build_info", "The server build (value 1): digits and onnxruntime versions as labels.",
            ["version", "onnxruntime"], registry=r)
        self.build_info.labels(version=__version__, onnxruntime=onnxruntime.__version__).set(1)
        for rpc in GRPC_RPCS:
            self.requests.labels(rpc=rpc, code="OK")
            self.images.labels(rpc=rpc)
            self.request_seconds.labels(rpc=rpc)
        for digit in DIGITS:
            self.predictions.labels(digit=digit)
        for reason in ("queue_full", "deadline", "cancelled"):
            self.rejected.labels(reason=reason)
        for reason in REJECTION_REASONS:
            self.rejected_predictions.labels(reason=reason)
            self.readings.labels(outcome=reason)
        self.readings.labels(outcome="accepted")
        for result in ("success", "failed"):
            self.model_reloads.labels(result=result)
            self.auth_token_reloads.labels(result=result)
        for protocol in ("grpc", "http"):
            for reason in ("missing", "malformed", "wrong"):
                self.auth_refusals.labels(protocol=protocol, reason=reason)

    def set_model(self, name: str, version: str, sha256: str, provider: str, load_seconds: float) -> None:
        """Point the model-info metric at a newly loaded model (the old label set goes away)."""
        self.model_info.clear()
        self.model_info.labels(name=name, version=version, sha256=sha256, provider=provider).set(1)
        self.model_load_seconds.set(load_seconds)
