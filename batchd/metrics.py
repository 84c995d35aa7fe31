"""One definition of every batchd metric (name, kind, help, labels, buckets) and the Prometheus
exporter behind /metrics. Every metric carries a `model` label. Another exporter (Ray's metrics
system, batchd/ray) builds the same metrics from the same SPECS; the engine only talks to a
`ModelMetrics`: `inc`, `observe`, `set`, and `track` for values read when scraped."""
from __future__ import annotations

import itertools
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# vLLM's bucket edges, so dashboards and SLOs written for vLLM read batchd the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
ENGINE_STATES = ("loading", "ready", "draining", "stopped", "dead")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    kind: str  # "counter" | "gauge" | "histogram"
    name: str  # counters without the _total suffix prometheus_client adds
    doc: str
    labels: tuple[str, ...] = ()  # beyond `model`
    buckets: tuple[float, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    # queue and batches (both tasks)
    MetricSpec("gauge", "batchd_queue_size", "Inputs or sequences waiting in the queue"),
    MetricSpec("gauge", "batchd_batch_inflight", "Batches or steps running or prepared"),
    MetricSpec("gauge", "batchd_engine_state", "1 for the engine's current state", ("state",)),
    MetricSpec("histogram", "batchd_batch_size", "Inputs (or sequences) per batch (or step)",
               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
    MetricSpec("histogram", "batchd_batch_tokens", "Padded tokens per batch",
               buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)),
    MetricSpec("counter", "batchd_batch_real_tokens", "Real tokens run by the model"),
    MetricSpec("counter", "batchd_batch_padded_tokens", "Tokens run including padding"),
    # requests
    MetricSpec("histogram", "batchd_request_queue_duration_seconds", "Time an input waited for the model",
               buckets=LATENCY_BUCKETS),
    MetricSpec("histogram", "batchd_request_tokenization_duration_seconds", "Time spent tokenizing a request",
               buckets=LATENCY_BUCKETS),
    MetricSpec("histogram", "batchd_request_inference_duration_seconds", "Model time of an input's batch",
               buckets=LATENCY_BUCKETS),
    MetricSpec("histogram", "batchd_request_duration_seconds", "End-to-end latency of completed requests",
               buckets=LATENCY_BUCKETS),
    MetricSpec("counter", "batchd_request", "Accepted requests by outcome", ("outcome",)),
    MetricSpec("counter", "batchd_request_failure", "Requests failed or refused, by reason", ("reason",)),
    MetricSpec("counter", "batchd_http_responses", "HTTP responses by status code", ("status",)),
    # generation, named as vLLM names them
    MetricSpec("gauge", "batchd_num_requests_running", "Sequences in the running batch"),
    MetricSpec("gauge", "batchd_num_requests_waiting", "Sequences waiting to join the running batch"),
    MetricSpec("gauge", "batchd_kv_cache_usage_perc", "Share of the KV cache's token positions in use (0..1)"),
    MetricSpec("counter", "batchd_prompt_tokens", "Prompt (input) tokens of accepted requests"),
    MetricSpec("counter", "batchd_generation_tokens", "Tokens generated"),
    MetricSpec("histogram", "batchd_time_to_first_token_seconds", "Time from arrival to the first token",
               buckets=TTFT_BUCKETS),
    MetricSpec("histogram", "batchd_inter_token_latency_seconds", "Time between two tokens of a sequence",
               buckets=ITL_BUCKETS),
    MetricSpec("histogram", "batchd_e2e_request_latency_seconds", "End-to-end latency of generation requests",
               buckets=E2E_BUCKETS),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}

Reading = Callable[[], "float | dict[str, float]"]  # a value, or one value per extra-label value


class ModelMetrics(Protocol):
    """What an engine records, for its own model; exporters implement it."""

    def inc(self, name: str, amount: float = 1.0, label: str | None = None) -> None: ...
    def observe(self, name: str, value: float) -> None: ...
    def track(self, name: str, read: Reading) -> None: ...


class PrometheusMetrics:
    """One registry for the whole server; `for_model(name)` hands an engine its labelled view."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._pulled: dict[str, list[tuple[str, Reading]]] = {}
        self._families: dict[str, Counter] = {}
        for spec in SPECS:
            labels = ["model", *spec.labels]
            if spec.kind == "gauge":
                self._pulled[spec.name] = []
            elif spec.kind == "counter":
                self._families[spec.name] = Counter(spec.name, spec.doc, labels, registry=self.registry)
        self._histograms = _Histograms([spec for spec in SPECS if spec.kind == "histogram"])
        self.registry.register(self._histograms)
        self.registry.register(_PulledGauges(self._pulled))

    def for_model(self, model: str) -> "PrometheusModelMetrics":
        return PrometheusModelMetrics(self, model)


class PrometheusModelMetrics:
    def __init__(self, exporter: PrometheusMetrics, model: str) -> None:
        self.exporter = exporter
        self.model = model
        self._families = exporter._families
        self._histograms = exporter._histograms
        self._pulled = exporter._pulled
        # labels() costs ~1 us: each child is looked up once, on first use (a series appears when
        # it is first recorded); after that a call is one dict lookup
        self._children: dict[object, object] = {}  # name, or (name, label)

    def _new_child(self, key: object):
        name, label = key if isinstance(key, tuple) else (key, None)
        labels = (self.model,) if label is None else (self.model, label)
        family = self._families.get(name)
        child = family.labels(*labels) if family is not None else self._histograms.series(name, labels)
        self._children[key] = child
        return child

    def inc(self, name: str, amount: float = 1.0, label: str | None = None) -> None:
        key = name if label is None else (name, label)
        (self._children.get(key) or self._new_child(key)).inc(amount)

    def observe(self, name: str, value: float) -> None:
        (self._children.get(name) or self._new_child(name)).observe(value)

    def track(self, name: str, read: Reading) -> None:
        self._pulled[name].append((self.model, read))


class _HistogramSeries:
    """One labelled histogram: bucket counts and a sum. prometheus_client's Histogram.observe walks
    its bucket bounds in a Python loop and takes a lock per value (~2 us, four or more per request,
    measured); this is one bisect. Observed and scraped on the event-loop thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket `le` bound: value <= bound
        self.sum += value


class _Histograms(Collector):
    """The histograms of SPECS, exported as Prometheus histograms (_bucket with `le`, _count, _sum)."""

    def __init__(self, specs: list[MetricSpec]) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._bounds = {spec.name: tuple(float(b) for b in spec.buckets) for spec in specs}
        self._series: dict[str, dict[tuple[str, ...], _HistogramSeries]] = {spec.name: {} for spec in specs}

    def series(self, name: str, labels: tuple[str, ...]) -> _HistogramSeries:
        found = self._series[name].get(labels)
        if found is None:
            found = self._series[name][labels] = _HistogramSeries(self._bounds[name])
        return found

    def collect(self) -> Iterable[HistogramMetricFamily]:
        for name, spec in self._specs.items():
            family = HistogramMetricFamily(name, spec.doc, labels=["model", *spec.labels])
            for labels, s in self._series[name].items():
                cumulative = list(itertools.accumulate(s.counts))
                buckets = [(floatToGoString(b), c) for b, c in zip(s.bounds, cumulative)]
                family.add_metric(list(labels), buckets + [("+Inf", cumulative[-1])], s.sum)
            yield family


class _PulledGauges(Collector):
    """Gauges read at scrape time (queue depth, running sequences...), never stale."""

    def __init__(self, pulled: dict[str, list[tuple[str, Reading]]]) -> None:
        self._pulled = pulled

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, readings in self._pulled.items():
            spec = SPEC_BY_NAME[name]
            family = GaugeMetricFamily(name, spec.doc, labels=["model", *spec.labels])
            for model, read in readings:
                value = read()
                if isinstance(value, dict):
                    for label, v in value.items():
                        family.add_metric([model, label], float(v))
                else:
                    family.add_metric([model], float(value))
            yield family


def state_reading(state: Callable[[], str]) -> Reading:
    """batchd_engine_state: 1 for the current state, 0 for the others (alerts match state="dead")."""
    return lambda: {s: float(state() == s) for s in ENGINE_STATES}


__all__ = ["SPECS", "SPEC_BY_NAME", "MetricSpec", "ModelMetrics", "PrometheusMetrics", "state_reading"]
