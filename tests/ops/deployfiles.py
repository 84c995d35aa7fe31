"""What tests/ops reads from deploy/: the dashboard's queries, the alert rules, and the batchd metric
names they use; and the names a real /metrics scrape declares."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import yaml
from prometheus_client.parser import text_string_to_metric_families

from batchd.testing import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD_SCRIPT = DEPLOY / "grafana" / "dashboard.py"
DASHBOARD = DEPLOY / "grafana" / "batchd.json"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
METRIC = re.compile(r"\bbatchd_\w+")
# a batchd metric with its label matchers, if any: `batchd_x{a="b", c=~"d"}`
SELECTOR = re.compile(r"\b(batchd_\w+)(\{[^}]*\})?")
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?=[\d.])")


@dataclass(frozen=True)
class PanelQuery:
    row: str
    panel: str
    expr: str


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[PanelQuery]:
    """Every target of every panel, with the row it sits under (panels follow their row)."""
    row, out = "", []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        out += [PanelQuery(row, panel["title"], target["expr"]) for target in panel.get("targets", [])]
    return out


def variable_queries() -> list[str]:
    return [v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names(exprs) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's `$name` / `${name}` template variables replaced by `values` (KeyError if one is unknown)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def as_bool(expr: str) -> str:
    """An alert expression that returns every series it compares, 0 or 1, instead of only the firing
    ones: `x > 2` -> `x > bool 2`. A healthy server's alerts return nothing, which would hide a
    misspelt label; this form shows that the inputs are there."""
    return COMPARISON.sub(lambda m: f"{m.group(1)} bool ", expr)


def scraped_names(exposition: str) -> set[str]:
    """Every sample name the scrape declares, from each family's type: a labelled family with no
    child yet (no request failed so far) declares its names all the same."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names
