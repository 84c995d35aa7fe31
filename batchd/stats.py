"""Counters and latency windows behind /stats, recorded into the metrics (batchd/metrics.py) at the
same time. One Stats per served model; updated on the event-loop thread only, so no locks."""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Callable

import numpy as np
from .metrics import ModelMetrics, PrometheusMetrics
from .policy import padding_ratio

_WINDOW = 20_000  # latest samples kept per latency series for percentiles
OUTCOMES = ("completed", "failed", "cancelled", "timed_out")


class Stats:
    def __init__(self, queue_size: Callable[[], int], inflight: Callable[[], int],
                 metrics: ModelMetrics | None = None) -> None:
        self._queue_size = queue_size
        self._inflight = inflight
        self.metrics = metrics or PrometheusMetrics().for_model("model")
        self.metrics.track("batchd_queue_size", queue_size)
        self.metrics.track("batchd_batch_inflight", inflight)
        self.started = time.monotonic()
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.requests_total = 0
        self.inputs_total = 0
        self.prompt_tokens = 0
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
    def request_accepted(self, n_inputs: int, tokenize_s: float, prompt_tokens: int = 0) -> None:
        self.requests_total += 1
        self.inputs_total += n_inputs
        self.prompt_tokens += prompt_tokens
        self.metrics.inc("batchd_prompt_tokens", prompt_tokens)
        self._tokenize_s.append(tokenize_s)
        self.metrics.observe("batchd_request_tokenization_duration_seconds", tokenize_s)

    def request_rejected(self, reason: str) -> None:
        """Refused before it was accepted (bad input, overload, not ready...)."""
        self.rejections[reason] += 1
        self.metrics.inc("batchd_request_failure", label=reason)

    def request_finished(self, outcome: str, seconds: float, reason: str | None = None) -> None:
        """Every accepted request ends here exactly once, with one of OUTCOMES."""
        self.outcomes[outcome] += 1
        self.metrics.inc("batchd_request", label=outcome)
        if outcome == "completed":
            self._request_s.append(seconds)
            self.metrics.observe("batchd_request_duration_seconds", seconds)
        else:
            self.metrics.inc("batchd_request_failure", label=reason or outcome)

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
        m.observe("batchd_batch_size", size)
        m.observe("batchd_batch_tokens", padded)
        m.inc("batchd_batch_real_tokens", real)
        m.inc("batchd_batch_padded_tokens", padded)
        for wait in queue_waits:
            self._queue_s.append(wait)
            m.observe("batchd_request_queue_duration_seconds", wait)
            m.observe("batchd_request_inference_duration_seconds", model_s)

    # ---- reporting -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "queue_depth": self._queue_size(),
            "inflight_batches": self._inflight(),
            "requests_total": self.requests_total,
            "inputs_total": self.inputs_total,
            "prompt_tokens": self.prompt_tokens,
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
