"""batchd's histograms (batchd/metrics.py) export exactly what prometheus_client's own Histogram does
for the same observations: same bucket edges and `le` labels, cumulative counts, _count and _sum."""
from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from batchd.metrics import SPECS, PrometheusMetrics


def _samples(registry: CollectorRegistry) -> set[str]:
    return {line for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line}


def test_histograms_match_prometheus_client_histograms_for_the_same_values():
    rng = random.Random(7)
    ours = PrometheusMetrics()
    reference = CollectorRegistry()
    for spec in (s for s in SPECS if s.kind == "histogram"):
        values = [0.0, *spec.buckets, spec.buckets[-1] * 10, *(rng.random() * spec.buckets[-1] for _ in range(200))]
        ref = Histogram(spec.name, spec.doc, ["model"], registry=reference, buckets=spec.buckets)
        for model in ("a", "b"):
            for v in values[: 50 if model == "b" else None]:  # edges land in their own bucket (le)
                ours.for_model(model).observe(spec.name, v)
                ref.labels(model).observe(v)
    expected = _samples(reference)
    got = {line for line in _samples(ours.registry)
           if any(line.startswith(s.name) for s in SPECS if s.kind == "histogram")}
    assert got == expected and len(expected) > 100


def test_a_histogram_family_is_declared_before_its_first_observation():
    text = generate_latest(PrometheusMetrics().registry).decode()
    for spec in (s for s in SPECS if s.kind == "histogram"):
        assert f"# TYPE {spec.name} histogram" in text
