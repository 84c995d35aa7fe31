"""batchd's metrics through Ray's metrics system, for replicas under Ray Serve.

The same SPECS as /metrics outside Ray (batchd/metrics.py): same names, help, labels and buckets.
`ray.serve.metrics` adds the `deployment`, `replica` and `application` tags by itself, so one
Prometheus scrape of Ray's metrics export (each node's metrics agent) sees every replica apart.
Ray prefixes custom metric names with `ray_` on export: `batchd_request_total` is exported as
`ray_batchd_request_total`.

Gauges that batchd reads at scrape time (`track`) have no scrape time here: Ray exports what a
process last recorded, so `run()` pushes every reading once per `interval_s`.
"""
from __future__ import annotations

import asyncio
import logging

from ray.serve import metrics as serve_metrics

from ..metrics import SPECS, Reading

log = logging.getLogger("batchd.ray.metrics")


class RayMetrics:
    """One per replica process; `for_model(name)` hands an engine its labelled view."""

    registry = None  # no Prometheus registry in a replica: Ray's metrics agent exports these

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._metrics: dict[str, serve_metrics.Counter | serve_metrics.Gauge | serve_metrics.Histogram] = {}
        self._label_key: dict[str, str | None] = {}
        self._tracked: list[tuple[str, str, Reading]] = []  # (metric name, model, read)
        for spec in SPECS:
            tag_keys = ("model", *spec.labels)
            if spec.kind == "counter":
                metric = serve_metrics.Counter(spec.name, spec.doc, tag_keys=tag_keys)
            elif spec.kind == "gauge":
                metric = serve_metrics.Gauge(spec.name, spec.doc, tag_keys=tag_keys)
            else:
                metric = serve_metrics.Histogram(spec.name, spec.doc, boundaries=list(spec.buckets),
                                                 tag_keys=tag_keys)
            self._metrics[spec.name] = metric
            self._label_key[spec.name] = spec.labels[0] if spec.labels else None

    def for_model(self, model: str) -> "RayModelMetrics":
        return RayModelMetrics(self, model)

    def push(self) -> None:
        """Record every tracked reading now (gauges hold the last value until the next push)."""
        for name, model, read in self._tracked:
            value = read()
            gauge = self._metrics[name]
            if isinstance(value, dict):
                key = self._label_key[name]
                for label, v in value.items():
                    gauge.set(float(v), tags={"model": model, key: label})
            else:
                gauge.set(float(value), tags={"model": model})

    async def run(self) -> None:
        """Push tracked readings every interval until cancelled (one small task per replica)."""
        while True:
            try:
                self.push()
            except Exception:  # a failing reading must not stop the others from being exported
                log.exception("pushing tracked metrics failed")
            await asyncio.sleep(self.interval_s)


class RayModelMetrics:
    """The ModelMetrics protocol (batchd/metrics.py) on Ray metrics, with tag dicts built once."""

    def __init__(self, owner: RayMetrics, model: str) -> None:
        self.model = model
        self.exporter = owner  # where the app records responses that name no model
        self._owner = owner
        self._tags: dict[tuple[str, str | None], dict[str, str]] = {}

    def _tags_for(self, name: str, label: str | None) -> dict[str, str]:
        tags = self._tags.get((name, label))
        if tags is None:
            tags = {"model": self.model}
            if label is not None:
                tags[self._owner._label_key[name]] = label  # type: ignore[index]
            self._tags[(name, label)] = tags
        return tags

    def inc(self, name: str, amount: float = 1.0, label: str | None = None) -> None:
        if amount > 0:  # Ray refuses inc(0), which prometheus_client accepts as a no-op
            self._owner._metrics[name].inc(float(amount), tags=self._tags_for(name, label))  # type: ignore[union-attr]

    def observe(self, name: str, value: float) -> None:
        self._owner._metrics[name].observe(float(value), tags=self._tags_for(name, None))  # type: ignore[union-attr]

    def track(self, name: str, read: Reading) -> None:
        self._owner._tracked.append((name, self.model, read))
