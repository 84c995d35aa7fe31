import math

import pytest

from batchd.estimators import ArrivalGap, BatchCost
from batchd.metrics import PrometheusMetrics
from batchd.stats import Stats


def test_padding_ratio_and_mean_batch_size_in_stats():
    stats = Stats(lambda: 3, lambda: 1)
    stats.batch_finished(size=4, calls=1, real=30, padded=40, model_s=0.01, queue_waits=[0.001] * 4)
    stats.batch_finished(size=2, calls=1, real=10, padded=10, model_s=0.02, queue_waits=[0.002] * 2)
    snap = stats.snapshot()
    assert snap["padding_ratio"] == pytest.approx(1 - 40 / 50)
    assert snap["mean_batch_size"] == 3
    assert (snap["real_tokens"], snap["padded_tokens"], snap["batches_total"]) == (40, 50, 2)
    assert (snap["queue_depth"], snap["inflight_batches"]) == (3, 1)
    assert snap["batch_size_histogram"] == {"2": 1, "4": 1}
    assert snap["latency_ms"]["model_time"]["p50"] == pytest.approx(15.0)


def test_reset_clears_counters_but_not_uptime():
    stats = Stats(lambda: 0, lambda: 0)
    stats.request_accepted(2, 0.001)
    stats.request_finished("completed", 0.01)
    stats.request_rejected("queue_full")
    stats.reset()
    snap = stats.snapshot()
    assert snap["requests_total"] == 0 and snap["rejections"] == {} and snap["outcomes"]["completed"] == 0
    assert snap["latency_ms"]["end_to_end"]["p50"] is None
    assert snap["uptime_s"] >= snap["since_reset_s"]


def test_prometheus_counts_padding_and_failures_by_reason():
    from prometheus_client import generate_latest

    exporter = PrometheusMetrics()
    stats = Stats(lambda: 5, lambda: 0, exporter.for_model("m"))
    stats.batch_finished(size=2, calls=1, real=7, padded=10, model_s=0.01, queue_waits=[0.0, 0.0])
    stats.request_rejected("queue_full")
    text = generate_latest(exporter.registry).decode()
    assert 'batchd_queue_size{model="m"} 5.0' in text
    assert 'batchd_batch_real_tokens_total{model="m"} 7.0' in text
    assert 'batchd_batch_padded_tokens_total{model="m"} 10.0' in text
    assert 'batchd_request_failure_total{model="m",reason="queue_full"} 1.0' in text


def test_batch_cost_recovers_overhead_and_per_token_cost():
    cost = BatchCost(decay=1.0)  # no forgetting: the fit is exact
    for tokens in (100, 400, 1600, 100, 800):
        cost.observe(tokens, tokens, 0.008 + tokens * 1e-4)
    assert cost.overhead_s == pytest.approx(0.008, rel=1e-3)
    assert cost.tokens_per_s == pytest.approx(3000 / (0.04 + 3000e-4), rel=1e-6)


def test_batch_cost_knows_nothing_from_one_size():
    cost = BatchCost()
    cost.observe(100, 100, 0.02)
    assert cost.overhead_s == 0.0


def test_arrival_gap_tracks_the_rate_and_grows_with_silence():
    gap = ArrivalGap(alpha=0.5)
    assert gap.expected(0.0) == math.inf
    for t in (0.0, 0.01, 0.02, 0.03):
        gap.observe(t)
    assert gap.expected(0.03) == pytest.approx(0.01)
    assert gap.expected(1.0) == pytest.approx(0.97)  # long silence: an idle server never holds
