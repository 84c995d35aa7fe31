"""The Grafana dashboard: the checked-in JSON is what the generator writes, and every query is
filtered by the template variables."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.ops.deployfiles import DASHBOARD, DASHBOARD_SCRIPT, SELECTOR, dashboard, panel_queries, variable_queries

REGENERATE = "python deploy/grafana/dashboard.py --write"


def test_checked_in_dashboard_is_what_the_generator_writes():
    pytest.importorskip("grafana_foundation_sdk", reason="the generator needs grafana-foundation-sdk: "
                        "pip install -e '.[ops]'")
    generated = subprocess.run([sys.executable, str(DASHBOARD_SCRIPT)], capture_output=True, text=True,
                               check=True, timeout=60).stdout
    assert generated == DASHBOARD.read_text(), f"{DASHBOARD.name} is stale: regenerate it with `{REGENERATE}`"


def test_template_variables_instance_and_model_come_from_a_batchd_metric():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "model"):
        assert variables[name]["query"].startswith("label_values(batchd_"), variables[name]["query"]
        assert variables[name]["query"].endswith(f", {name})"), variables[name]["query"]


def test_every_panel_query_selects_by_instance_and_model():
    queries = panel_queries()
    assert len(queries) >= 20
    for query in queries:
        for name, matchers in SELECTOR.findall(query.expr):
            assert 'instance=~"$instance"' in matchers and 'model=~"$model"' in matchers, \
                f"{query.panel}: {name} is not filtered by $instance and $model in {query.expr}"


def test_every_panel_reads_the_datasource_variable():
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_the_panels_an_operator_needs_are_there():
    exprs = " ".join(q.expr for q in panel_queries())
    for needed in ("histogram_quantile(0.99, sum by (model, le) (rate(batchd_request_duration_seconds_bucket",
                   "histogram_quantile(0.99, sum by (model, le) (rate(batchd_request_queue_duration_seconds_bucket",
                   "histogram_quantile(0.99, sum by (model, le) (rate(batchd_request_inference_duration_seconds_b",
                   "histogram_quantile(0.99, sum by (model, le) (rate(batchd_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (model, le) (rate(batchd_inter_token_latency_seconds_bucket",
                   "1 - sum by (model) (rate(batchd_batch_real_tokens_total",
                   "batchd_kv_cache_usage_perc", "batchd_num_requests_running", "batchd_num_requests_waiting",
                   "batchd_generation_tokens_total", "batchd_queue_size", "batchd_batch_inflight"):
        assert needed in exprs, needed
    assert any(p["type"] == "heatmap" for p in dashboard()["panels"])
    assert all(q.startswith("label_values(") for q in variable_queries())
