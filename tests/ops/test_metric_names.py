"""Every metric name the dashboard and the alert rules use is one a running batchd exports. Needs
no Prometheus: the names are read out of the PromQL and out of a real /metrics scrape."""
from __future__ import annotations

import httpx
import pytest

from tests.ops.conftest import EMBED_MODEL
from tests.ops.deployfiles import alert_rules, metric_names, panel_queries, scraped_names, variable_queries

pytestmark = pytest.mark.slow  # starts a server process


def test_every_metric_the_dashboard_and_alerts_use_is_exported(batchd):
    # one request, so that the labelled series have children too (the check reads the declared families)
    httpx.post(f"{batchd.url}/v1/embeddings", json={"input": ["a few words"], "model": EMBED_MODEL}, timeout=30)
    status, body = batchd.get("/metrics")
    assert status == 200
    exported = scraped_names(body.decode())
    used = metric_names([q.expr for q in panel_queries()] + variable_queries() + [r["expr"] for r in alert_rules()])
    assert len(used) >= 20
    assert not used - exported, f"used by deploy/ but not in batchd's /metrics: {sorted(used - exported)}"


def test_the_name_check_sees_a_missing_name():
    exposition = "# TYPE batchd_queue_size gauge\nbatchd_queue_size 0\n# TYPE batchd_request counter\n"
    assert scraped_names(exposition) == {"batchd_queue_size", "batchd_request_total"}
    assert metric_names(["rate(batchd_request_total[1m]) / batchd_nope_bucket"]) - scraped_names(exposition) \
        == {"batchd_nope_bucket"}
