"""Counters and latency windows behind /stats, and the Prometheus metrics behind /metrics.
Updated on the event-loop thread only, so no locks."""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram

from .policy import padding_ratio

_WINDOW = 20_000  # latest samples kept per latency series for percentiles
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OUTCOMES = ("completed", "failed", "cancelled", "timed_out")


class Metrics:
    """Prometheus names in the style of TEI/vLLM; one registry per engine."""

    def __init__(self, queue_size: Callable[[], float], inflight: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("batchd_queue_size", "Inputs waiting in the queue", registry=r).set_function(queue_size)
        Gauge("batchd_batch_inflight", "Batches running or prepared", registry=r).set_function(inflight)
        self.batch_size = Histogram("batchd_batch_size", "Inputs per batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tokens = Histogram("batchd_batch_tokens", "Padded tokens per batch", registry=r,
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768))
        self.real_tokens = PCounter("batchd_batch_real_tokens", "Real tokens run by the model", registry=r)
        self.padded_tokens = PCounter("batchd_batch_padded_tokens", "Tokens run including padding", registry=r)
        hist = lambda name, doc: Histogram(name, doc, registry=r, buckets=_LATENCY_BUCKETS)  # noqa: E731
        self.queue_s = hist("batchd_request_queue_duration_seconds", "Time an input waited for its batch")
        self.tokenize_s = hist("batchd_request_tokenization_duration_seconds", "Time spent tokenizing a request")
        self.inference_s = hist("batchd_request_inference_duration_seconds", "Model time of an input's batch")
        self.request_s = hist("batchd_request_duration_seconds", "End-to-end request latency")
        self.requests = PCounter("batchd_request", "Requests by outcome", ["outcome"], registry=r)
        self.failures = PCounter("batchd_request_failure", "Requests failed or refused, by reason", ["reason"], registry=r)


class Stats:
    def __init__(self, queue_size: Callable[[], int], inflight: Callable[[], int]) -> None:
        self._queue_size = queue_size
        self._inflight = inflight
        self.metrics = Metrics(queue_size, inflight)
        self.started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.requests_total = 0
        self.inputs_total = 0
        self.batches_total = 0
        self.batch_inputs = 0
        self.model_calls = 0
        self.real_tokens = 0
        self.padded_tokens = 0
        self.outcomes: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self._queue_s: deque[float] = deque(maxlen=_WINDOW)
        self._model_s: deque[float] = deque(maxlen=_WINDOW)
        self._request_s: deque[float] = deque(maxlen=_WINDOW)
        self._tokenize_s: deque[float] = deque(maxlen=_WINDOW)

    # ---- recording -----------------------------------------------------------------------------
    def request_accepted(self, n_inputs: int, tokenize_s: float) -> None:
        self.requests_total += 1
        self.inputs_total += n_inputs
        self._tokenize_s.append(tokenize_s)
        self.metrics.tokenize_s.observe(tokenize_s)

    def request_rejected(self, reason: str) -> None:
        """Refused before it was accepted (bad input, overload, not ready...)."""
        self.rejections[reason] += 1
        self.metrics.failures.labels(reason).inc()

    def request_finished(self, outcome: str, seconds: float, reason: str | None = None) -> None:
        """Every accepted request ends here exactly once, with one of OUTCOMES."""
        self.outcomes[outcome] += 1
        self.metrics.requests.labels(outcome).inc()
        if outcome == "completed":
            self._request_s.append(seconds)
            self.metrics.request_s.observe(seconds)
        else:
            self.metrics.failures.labels(reason or outcome).inc()

    def batch_finished(self, size: int, calls: int, real: int, padded: int, model_s: float,
                       queue_waits: list[float]) -> None:
        self.batches_total += 1
        self.batch_inputs += size
        self.model_calls += calls
        self.batch_sizes[size] += 1
        self.real_tokens += real
        self.padded_tokens += padded
        self._model_s.append(model_s)
        m = self.metrics
        m.batch_size.observe(size)
        m.batch_tokens.observe(padded)
        m.real_tokens.inc(real)
        m.padded_tokens.inc(padded)
        for wait in queue_waits:
            self._queue_s.append(wait)
            m.queue_s.observe(wait)
            m.inference_s.observe(model_s)

    # ---- reporting -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "queue_depth": self._queue_size(),
            "inflight_batches": self._inflight(),
            "requests_total": self.requests_total,
            "inputs_total": self.inputs_total,
            "batches_total": self.batches_total,
            "mean_batch_size": self.batch_inputs / self.batches_total if self.batches_total else 0.0,
            "padding_ratio": padding_ratio(self.real_tokens, self.padded_tokens),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "model_calls": self.model_calls,
            "outcomes": {k: self.outcomes.get(k, 0) for k in OUTCOMES},
            "rejections": dict(self.rejections),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "latency_ms": {
                "queue_wait": _percentiles(self._queue_s),
                "model_time": _percentiles(self._model_s),
                "end_to_end": _percentiles(self._request_s),
                "tokenization": _percentiles(self._tokenize_s),
            },
            "since_reset_s": now - self.since,
            "uptime_s": now - self.started,
        }


def _percentiles(samples: deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.fromiter(samples, dtype=np.float64), [50, 90, 99]) * 1e3
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}
