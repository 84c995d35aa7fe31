"""The alert rules and the example scrape config, checked and unit-tested by promtool."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.ops.deployfiles import ALERTS, PROMETHEUS_DIR, alert_rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed: apt-get install -y prometheus")


def promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@needs_promtool
def test_alert_rules_are_valid():
    assert f"SUCCESS: {len(alert_rules())} rules found" in promtool("check", "rules", ALERTS.name)


@needs_promtool
def test_alert_unit_tests_pass():
    promtool("test", "rules", "alerts_test.yml")


@needs_promtool
def test_example_scrape_config_is_valid_and_loads_the_alerts():
    out = promtool("check", "config", "prometheus.yml")
    assert "1 rule files found" in out and ALERTS.name in out


def test_every_alert_says_what_and_how_bad():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"BatchdTargetDown", "BatchdEngineDead", "BatchdEngineNotReady", "BatchdSustainedRefusals",
            "BatchdHighLatencyP99", "BatchdQueueGrowing", "BatchdServerErrors"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule.get("for"), f"{rule['alert']} would fire on a single evaluation"


def test_every_alert_has_unit_tests_where_it_fires_and_where_it_must_not():
    cases = [case for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
             for case in test["alert_rule_test"]]
    alerts = {rule["alert"] for rule in alert_rules()}
    assert {case["alertname"] for case in cases if case.get("exp_alerts")} == alerts
    assert {case["alertname"] for case in cases if not case.get("exp_alerts")} == alerts
