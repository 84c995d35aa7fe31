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
        # series exist from the start, so rate() sees the first refusal or failure too
        for outcome in OUTCOMES:
            self.metrics.inc("batchd_request", 0, label=outcome)
        for reason in ("queue_full", "deadline_unmeetable"):
            self.metrics.inc("batchd_request_failure", 0, label=reason)
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


class GenerationStats(Stats):
    """Stats plus what vLLM users watch: running/waiting sequences, KV cache use, generated tokens,
    time to first token, inter-token latency, end-to-end latency."""

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int], kv_usage: Callable[[], float],
                 metrics: ModelMetrics | None = None) -> None:
        super().__init__(waiting, lambda: int(running() > 0), metrics)
        self._running, self._kv_usage = running, kv_usage
        self.metrics.track("batchd_num_requests_waiting", waiting)
        self.metrics.track("batchd_num_requests_running", running)
        self.metrics.track("batchd_kv_cache_usage_perc", kv_usage)

    def reset(self) -> None:
        super().reset()
        self.generation_tokens = 0
        self.steps = 0
        self._ttft_s: deque[float] = deque(maxlen=_WINDOW)
        self._itl_s: deque[float] = deque(maxlen=_WINDOW)
        self._e2e_s: deque[float] = deque(maxlen=_WINDOW)

    def token(self, since_previous: float, first: bool) -> None:
        """One generated token; `since_previous` is from arrival for the first one."""
        self.generation_tokens += 1
        self.metrics.inc("batchd_generation_tokens")
        if first:
            self._ttft_s.append(since_previous)
            self.metrics.observe("batchd_time_to_first_token_seconds", since_previous)
        else:
            self._itl_s.append(since_previous)
            self.metrics.observe("batchd_inter_token_latency_seconds", since_previous)

    def step_finished(self, sequences: int, tokens: int, model_s: float) -> None:
        self.steps += 1
        self.batch_finished(sequences, 1, tokens, tokens, model_s, [])

    def request_finished(self, outcome: str, seconds: float, reason: str | None = None) -> None:
        super().request_finished(outcome, seconds, reason)
        if outcome == "completed":
            self._e2e_s.append(seconds)
            self.metrics.observe("batchd_e2e_request_latency_seconds", seconds)

    def snapshot(self) -> dict:
        snap = super().snapshot()
        snap.update({
            "num_requests_running": self._running(),
            "num_requests_waiting": self._queue_size(),
            "kv_cache_usage_perc": self._kv_usage(),
            "generation_tokens": self.generation_tokens,
            "steps_total": self.steps,
        })
        snap["latency_ms"].update({"time_to_first_token": _percentiles(self._ttft_s),
                                   "inter_token": _percentiles(self._itl_s),
                                   "e2e_generation": _percentiles(self._e2e_s)})
        return snap
