"""The dashboard and the alert rules against the real thing: a batchd under load, scraped every
second by a real Prometheus that loads alerts.yml; every panel query, variable query and alert
expression is evaluated through Prometheus' HTTP API."""
from __future__ import annotations

import asyncio
import math
import random
import re
import shutil
import subprocess
import time
from collections import Counter

import httpx
import pytest

from tests.ops.conftest import EMBED_MODEL, GENERATE_MODEL
from tests.ops.deployfiles import alert_rules, as_bool, dashboard, panel_queries, substitute

pytestmark = pytest.mark.slow

LOAD_S = 8.0
# Grafana's built-in intervals: 15 s spans the whole load when the queries run just after it
INTERVALS = {"__rate_interval": "15s", "__interval": "15s"}
WORDS = "server batch queue latency token model thread vector padding bucket budget client request".split()


async def _load(url: str) -> Counter:
    """About 300 embedding requests over LOAD_S seconds from 10 clients, with, halfway, a burst past
    batching.max_queue (429) and one request of each kind of failure; and chats from 4 clients to
    the generation model if one is served. Returns the status counts."""
    rng = random.Random(7)
    statuses: Counter = Counter()

    def texts(n: int) -> list[str]:
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))) for _ in range(n)]

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def post(inputs: list[str], model: str = EMBED_MODEL) -> None:
            response = await client.post("/v1/embeddings", json={"input": inputs, "model": model})
            statuses[response.status_code] += 1

        async def steady(stop: float) -> None:
            while time.monotonic() < stop:
                await post(texts(rng.randint(1, 4)))
                await asyncio.sleep(0.1)

        async def chats(stop: float) -> None:
            while time.monotonic() < stop:
                response = await client.post("/v1/chat/completions", json={
                    "model": GENERATE_MODEL, "messages": [{"role": "user", "content": " ".join(texts(1))}],
                    "max_tokens": rng.randint(4, 24), "ignore_eos": True})
                statuses[response.status_code] += 1
                await asyncio.sleep(0.1)

        stop = time.monotonic() + LOAD_S
        workers = [asyncio.create_task(steady(stop)) for _ in range(10)]
        workers += [asyncio.create_task(chats(stop)) for _ in range(4 if GENERATE_MODEL else 0)]
        await asyncio.sleep(LOAD_S / 2)
        await asyncio.gather(*(post(texts(8)) for _ in range(30)))  # 240 inputs at once, the queue holds 32
        await post([])  # 400 invalid_value
        await post(["hello"], model="no-such-model")  # 404 model_not_found
        await post(["__poison__ fails in the model"])  # 500 inference_failed
        await asyncio.gather(*workers)
    return statuses


@pytest.fixture(scope="module")
def loaded(batchd, prometheus):
    """Prometheus has scraped batchd before, during and after the load; returns the evaluation time."""
    give_up = time.monotonic() + 20
    while not prometheus.query('up{job="batchd"} == 1'):
        assert time.monotonic() < give_up, f"prometheus never scraped batchd: {prometheus.log_text()}"
        time.sleep(0.2)
    statuses = asyncio.run(_load(batchd.url))
    assert statuses[200] > 100 and statuses[429] > 0 and statuses[400] and statuses[404] and statuses[500], statuses
    time.sleep(2.5)  # two more scrapes and rule evaluations
    return time.time()


def _regex(values: list[str]) -> str:
    """A multi-value selection as Grafana writes it into a Prometheus regex: (a|b), specials escaped."""
    return "(" + "|".join(re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values) + ")"


@pytest.fixture(scope="module")
def variables(prometheus, loaded) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The dashboard's variables resolved as Grafana resolves them: each label_values() query in
    order (model's depends on instance), every value selected. Returns the substitutions for the
    queries and the values found."""
    substitutions, found = dict(INTERVALS), {}
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()
        found[variable["name"]] = prometheus.api(f"label/{label}/values", start=loaded - 60, end=loaded,
                                                 **{"match[]": substitute(selector, substitutions)})
        substitutions[variable["name"]] = _regex(found[variable["name"]])
    return substitutions, found


def test_variables_list_the_served_instance_and_model(batchd, variables):
    _, found = variables
    assert found["instance"] == [f"{batchd.host}:{batchd.port}"]
    assert EMBED_MODEL in found["model"] and (GENERATE_MODEL is None or GENERATE_MODEL in found["model"])


def test_every_panel_query_runs_and_has_data(prometheus, loaded, variables):
    """Every query runs without error; every panel has data under load, except the generation panels
    when no generation model is served."""
    empty = []
    for query in panel_queries():
        result = prometheus.query(substitute(query.expr, variables[0]), at=loaded)  # fails on a query error
        has_data = any(not math.isnan(float(series["value"][1])) for series in result)
        if not has_data and (query.row != "Generation" or GENERATE_MODEL):
            empty.append(f"{query.row} / {query.panel}: {query.expr}")
    assert not empty, "panels without data under load:\n" + "\n".join(empty)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_expression_runs_and_sees_its_inputs(prometheus, loaded, rule):
    prometheus.query(rule["expr"], at=loaded)
    # the comparison as 0/1 for every series it compares: empty would mean a wrong name or label
    assert prometheus.query(as_bool(rule["expr"]), at=loaded), f"{rule['alert']}: no series for {rule['expr']}"


def test_prometheus_evaluates_every_loaded_rule_without_error(prometheus, loaded):
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def test_promtool_accepts_a_real_scrape(batchd, loaded):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: apt-get install -y prometheus")
    status, body = batchd.get("/metrics")
    assert status == 200
    done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, f"promtool check metrics:\n{done.stdout.decode()}{done.stderr.decode()}"
