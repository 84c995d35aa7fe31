"""batchd on a local two-node Ray cluster (one replica per node, the fake backend): both replicas
answer, each still batches, results equal a plain in-process batchd's, Ray's metrics export shows
every replica, and a replica killed under load is replaced without a lost or hung request."""
from __future__ import annotations

import asyncio
import re
import socket
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray tests need Ray Serve: pip install .[ray]")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from batchd.config import config_from_dict  # noqa: E402
from batchd.metrics import SPEC_BY_NAME  # noqa: E402
from batchd.ray.deployment import APP_NAME, build_app  # noqa: E402
from batchd.ray.proxy import CLUSTER_ENV  # noqa: E402
from tests.helpers import app_client  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")]

# A slow fake model (30 ms a batch of up to 8, plus 0.1 ms a padded token), so that concurrent
# requests must share batches.
CONFIG = {
    "server": {"request_timeout_s": 20},
    "models": [{"name": "fake", "backend": "fake", "fake_batch_ms": 30, "fake_token_us": 100,
                "batching": {"max_batch_size": 8}}],
    # one CPU per replica, one CPU per node: Ray must put one replica on each node
    "ray": {"num_replicas": 2, "num_cpus": 1, "health_check_period_s": 1},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """(base url, metrics export urls, cluster start-up seconds)."""
    metrics_ports = [_free_port(), _free_port()]
    began = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CLUSTER_ENV.items():  # the nodes' processes (Ray's proxy) inherit these
            mp.setenv(key, value)
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "metrics_export_port": metrics_ports[0],
            "_system_config": {"metrics_report_interval_ms": 1000}})  # export replicas' metrics within ~1 s
        nodes.add_node(num_cpus=1, metrics_export_port=metrics_ports[1])
    try:
        ray.init(address=nodes.address)
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port,
                                                             "request_timeout_s": 25})  # as `batchd ray`
        serve.run(build_app(config_from_dict(CONFIG)), name=APP_NAME, route_prefix="/")
        print(f"two-node Ray cluster and 2 replicas ready in {time.monotonic() - began:.1f} s")
        yield f"http://127.0.0.1:{port}", [f"http://127.0.0.1:{p}/metrics" for p in metrics_ports]
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} text number {i} " + "word " * (i % 7) for i in range(n)]


async def _embed_all(base: str, texts: list[str], timeout: float = 30) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=timeout,
                                 limits=httpx.Limits(max_connections=len(texts))) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": t, "model": "fake"})
                                      for t in texts))


async def test_both_replicas_answer_and_batch_with_the_same_results_as_plain_batchd(cluster):
    base, _ = cluster
    texts = _texts(96, "both")
    responses = await _embed_all(base, texts)
    assert [r.status_code for r in responses] == [200] * len(texts)
    instances = {r.headers["x-batchd-instance"] for r in responses}
    assert len(instances) == 2, instances
    for instance in instances:  # each replica batched: 96 concurrent requests, batches of up to 8
        sizes = [int(r.headers["x-batch-size"]) for r in responses if r.headers["x-batchd-instance"] == instance]
        assert max(sizes) > 1, (instance, sizes)
    stats = httpx.get(f"{base}/stats", timeout=10)
    assert stats.json()["scope"] == "replica" and stats.json()["instance"] == stats.headers["x-batchd-instance"]
    plain = config_from_dict({k: v for k, v in CONFIG.items() if k != "ray"})
    async with app_client(plain) as (client, _):
        assert (await client.get("/stats")).json()["scope"] == "server"
        for text, response in zip(texts, responses):
            expected = (await client.post("/v1/embeddings", json={"input": text})).json()["data"][0]["embedding"]
            assert np.allclose(response.json()["data"][0]["embedding"], expected, atol=1e-6), text


def _scrape(urls: list[str], name: str) -> list[tuple[dict[str, str], float]]:
    samples = []
    for url in urls:
        for line in httpx.get(url, timeout=10).text.splitlines():
            match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
                samples.append((labels, float(match.group(2))))
    return samples


async def test_rays_metrics_export_shows_each_replica_with_batchds_names_and_buckets(cluster):
    base, metrics_urls = cluster
    responses = await _embed_all(base, _texts(48, "metrics"))
    replicas = {r.headers["x-batchd-instance"] for r in responses}
    give_up = time.monotonic() + 20
    while True:
        completed = [(labels, v) for labels, v in _scrape(metrics_urls, "ray_batchd_request_total")
                     if labels.get("outcome") == "completed" and labels.get("model") == "fake"]
        seen = {labels["replica"] for labels, _ in completed}
        if replicas <= seen or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.5)
    assert replicas <= seen, (replicas, seen)
    assert sum(v for _, v in completed) >= 48
    edges = {labels["le"] for labels, _ in _scrape(metrics_urls, "ray_batchd_batch_size_bucket")}
    assert edges == {str(float(b)) for b in SPEC_BY_NAME["batchd_batch_size"].buckets} | {"+Inf"}
    queue = _scrape(metrics_urls, "ray_batchd_queue_size")  # a tracked reading, pushed every second
    assert replicas <= {labels["replica"] for labels, _ in queue}


async def test_a_killed_replica_is_replaced_and_no_request_is_lost_or_hangs(cluster):
    base, _ = cluster
    deadline_s = 5.0
    outcomes: list[tuple[int, float, str | None]] = []

    async def client_loop(client: httpx.AsyncClient, stop_at: float, worker: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            started = time.monotonic()
            r = await client.post("/v1/embeddings", json={"input": f"kill {worker} {i}"},
                                  headers={"x-request-timeout": str(deadline_s)})
            outcomes.append((r.status_code, time.monotonic() - started, r.headers.get("x-batchd-instance")))
            i += 1

    async with httpx.AsyncClient(base_url=base, timeout=deadline_s + 10) as client:
        before = {r.headers["x-batchd-instance"] for r in await _embed_all(base, _texts(32, "before"))}
        victim = sorted(before)[0]
        stop_at = time.monotonic() + 6
        load = asyncio.gather(*(client_loop(client, stop_at, w) for w in range(16)))
        await asyncio.sleep(1.5)
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{victim}"))
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        await load
    statuses = {status for status, _, _ in outcomes}
    assert statuses <= {200, 503}, statuses  # 200 (retried on a live replica) or a clean 503
    assert sum(status == 200 for status, _, _ in outcomes) >= 0.99 * len(outcomes)
    assert max(seconds for _, seconds, _ in outcomes) < deadline_s + 2  # nothing hung past its deadline
    # Ray starts a new replica (a new id) in the victim's place; both serve again
    give_up = time.monotonic() + 60
    while True:
        now = {r.headers["x-batchd-instance"] for r in await _embed_all(base, _texts(32, "after"))}
        if len(now) == 2 and victim not in now or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.5)
    assert len(now) == 2 and victim not in now, (before, now)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/health")).status_code == 200


async def test_a_replica_whose_engine_died_fails_rays_health_check_and_is_replaced(cluster):
    base, _ = cluster
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        before = {r.headers["x-batchd-instance"] for r in await _embed_all(base, _texts(32, "alive"))}
        dying = await client.post("/v1/embeddings", json={"input": "__fatal__"})  # the fake's device dies
        assert dying.status_code == 503 and dying.json()["error"]["code"] == "engine_dead"
        dead = dying.headers["x-batchd-instance"]
        give_up = time.monotonic() + 60
        while True:  # until Ray's health check (every second here) has replaced it
            responses = await _embed_all(base, _texts(32, "replaced"))
            now = {r.headers.get("x-batchd-instance") for r in responses if r.status_code == 200}
            # meanwhile the dead replica answers a clean 503 engine_dead, never a hang or a 500
            assert {r.status_code for r in responses} <= {200, 503}
            if len(now) == 2 and dead not in now or time.monotonic() > give_up:
                break
            await asyncio.sleep(0.5)
    assert dead in before and len(now) == 2 and dead not in now, (before, dead, now)


async def _each_replica(base: str, method: str, path: str) -> dict[str, dict]:
    """One answer from each of the two replicas (Ray's proxy picks one per call)."""
    answers: dict[str, dict] = {}
    give_up = time.monotonic() + 10
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while len(answers) < 2 and time.monotonic() < give_up:
            r = await client.request(method, path)
            answers[r.headers["x-batchd-instance"]] = r.json()
    assert len(answers) == 2, answers
    return answers


async def test_a_client_that_leaves_has_its_queued_inputs_dropped_on_the_replica(cluster):
    base, _ = cluster
    await _each_replica(base, "POST", "/stats/reset")
    # 96 clients of long texts (a batch of 8 takes ~230 ms) that give up after 0.5 s: most leave
    # while their input waits in a replica's queue
    long = "word " * 240
    async with httpx.AsyncClient(base_url=base, timeout=0.5, limits=httpx.Limits(max_connections=96)) as client:
        results = await asyncio.gather(*(client.post("/v1/embeddings", json={"input": f"leave {i} {long}"})
                                         for i in range(96)), return_exceptions=True)
    assert sum(isinstance(r, httpx.TimeoutException) for r in results) > 48
    await asyncio.sleep(1)  # what was running has finished
    stats = (await _each_replica(base, "GET", "/stats")).values()
    accepted = sum(s["requests_total"] for s in stats)
    ran = sum(round(s["mean_batch_size"] * s["batches_total"]) for s in stats)
    # Ray cancels the replica's request when its client leaves; batchd drops its queued input
    assert sum(s["outcomes"]["cancelled"] for s in stats) > 0 and ran < accepted, list(stats)
