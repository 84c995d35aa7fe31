"""batchd on Ray, without a cluster: derived deployment options, the [ray] section, the proxy's retry
middleware, the instance header, and the Ray metrics exporter against batchd's one metric table."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray tests need Ray Serve: pip install .[ray]")

from batchd.api.app import ResponseHooks  # noqa: E402
from batchd.api.instance import default_instance_id  # noqa: E402
from batchd.config import ConfigError, config_from_dict  # noqa: E402
from batchd.metrics import SPECS  # noqa: E402
from batchd.ray.deployment import app_builder, batch_capacity, deployment_options  # noqa: E402
from batchd.ray.metrics import RayMetrics  # noqa: E402
from batchd.ray.proxy import BODY_KEY, BodyFromScope, RetryLostReplica  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


def _config(**ray: object) -> object:
    return config_from_dict({
        "models": [
            {"name": "e", "backend": "fake", "batching": {"max_batch_size": 16}},
            {"name": "e2", "backend": "fake", "batching": {"max_batch_size": 48}},
        ],
        "ray": ray,
    })


# ---- deployment options ------------------------------------------------------------------------
def test_the_replica_cap_is_batchds_own_queue_bound_and_at_least_two_batches():
    options = deployment_options(_config())
    assert batch_capacity(_config()) == 16 + 48
    assert options["max_ongoing_requests"] == (4096 + 2 * 16) + (4096 + 2 * 48)  # queued + in flight
    small_queue = config_from_dict({"models": [
        {"name": "e", "backend": "fake", "batching": {"max_batch_size": 64, "max_queue": 10, "max_inflight_batches": 1}}]})
    assert deployment_options(small_queue)["max_ongoing_requests"] == 2 * 64  # one running, one forming
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_a_generation_model_counts_its_running_sequences():
    config = config_from_dict({"models": [
        {"name": "g", "backend": "fake", "task": "generate", "generation": {"max_running_seqs": 24}}]})
    assert batch_capacity(config) == 24
    assert deployment_options(config)["max_ongoing_requests"] == 1024 + 24


def test_explicit_ray_settings_win_and_autoscaling_targets_a_full_batch():
    options = deployment_options(_config(max_ongoing_requests=500, num_cpus=2, num_gpus=0.5,
                                         min_replicas=1, max_replicas=4), replicas=2)
    assert options["max_ongoing_requests"] == 500
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 64}
    assert deployment_options(_config(min_replicas=1, max_replicas=4, target_ongoing_requests=10),
                              )["autoscaling_config"]["target_ongoing_requests"] == 10
    assert deployment_options(_config(num_replicas=3))["num_replicas"] == 3
    assert deployment_options(_config(num_replicas=3), replicas=5)["num_replicas"] == 5


@pytest.mark.parametrize("ray, key", [
    ({"num_replicas": 0}, "ray.num_replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "ray.max_replicas"),
    ({"num_cpus": -1}, "ray.num_cpus"),
    ({"proxy_location": "Nowhere"}, "proxy_location"),
    ({"replicas": 2}, "replicas"),
])
def test_a_bad_ray_section_is_refused_naming_the_key(ray, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"ray": ray})


def test_app_builder_reads_the_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[models]]\nname = "x"\nbackend = "fake"\n[ray]\nnum_replicas = 2\n')
    app = app_builder({"config": str(path), "set": "ray.num_cpus=0.25"})
    options = app._bound_deployment._deployment_config
    assert app._bound_deployment.num_replicas == 2
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0.25
    assert options.max_ongoing_requests == 4096 + 2 * 64
    assert app_builder({"config": str(path), "replicas": "3"})._bound_deployment.num_replicas == 3
    with pytest.raises(ValueError, match="ray.num_replicas"):
        app_builder({"config": str(path), "set": ["ray.num_replicas=0"]})


# ---- the proxy's retry middleware -------------------------------------------------------------
class FlakyApp:
    """An ASGI app like Ray's proxy: the first `lost` calls end without a response (the replica
    died), then it echoes the body it received."""

    def __init__(self, lost: int, answer_500: bool = False) -> None:
        self.lost = lost
        self.answer_500 = answer_500
        self.bodies: list[bytes] = []
        self.scope_bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        self.scope_bodies.append(scope[BODY_KEY])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if self.answer_500:  # batchd's own answer (say, inference_failed): the replica lives
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"failed"})
            return
        if len(self.bodies) <= self.lost:
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-attempt", b"%d" % len(self.bodies))]})
        await send({"type": "http.response.body", "body": body})


async def _post(app, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test") as client:
        return await client.post("/v1/embeddings", content=body)


async def test_a_request_whose_replica_died_is_sent_again_with_its_whole_body():
    inner = FlakyApp(lost=2)
    body = json.dumps({"input": ["x" * 100_000]}).encode()
    response = await _post(RetryLostReplica(inner, backoff_s=0), body)
    assert response.status_code == 200 and response.content == body
    assert response.headers["x-attempt"] == "3"
    assert inner.bodies == [body, body, body]
    assert inner.scope_bodies == [body, body, body]  # and in the scope, for the replica to take


async def test_when_every_attempt_is_lost_the_client_gets_a_clean_503():
    inner = FlakyApp(lost=99)
    response = await _post(RetryLostReplica(inner, attempts=3, backoff_s=0), b"{}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "replica_unavailable"
    assert len(inner.bodies) == 3


async def test_an_answer_is_never_retried_even_a_500():
    inner = FlakyApp(lost=0, answer_500=True)
    response = await _post(RetryLostReplica(inner, backoff_s=0), b"{}")
    assert response.status_code == 500 and len(inner.bodies) == 1


# ---- x-batchd-instance ------------------------------------------------------------------------
async def test_instance_header_on_every_response_and_host_pid_outside_a_replica():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": [(b"a", b"b")]})
        await send({"type": "http.response.body", "body": b""})

    ident = default_instance_id()  # ray.serve is imported here, yet this process is no replica
    host, _, pid = ident.rpartition(":")
    assert host and pid.isdigit()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ResponseHooks(app, "r-1")),
                                 base_url="http://x.test") as client:
        response = await client.get("/anything")
    assert response.headers["x-batchd-instance"] == "r-1" and response.headers["a"] == "b"


# ---- Ray metrics ------------------------------------------------------------------------------
def test_ray_metrics_are_the_same_table_as_prometheus():
    exporter = RayMetrics()
    for spec in SPECS:
        metric = exporter._metrics[spec.name]
        assert metric._name == spec.name and metric._description == spec.doc
        assert metric._tag_keys[-len(spec.labels) - 1:] == ("model", *spec.labels)
        assert type(metric).__name__ == {"counter": "Counter", "gauge": "Gauge", "histogram": "Histogram"}[spec.kind]
        if spec.kind == "histogram":
            assert tuple(metric.boundaries) == spec.buckets


def test_ray_model_metrics_take_what_the_engine_records():
    exporter = RayMetrics()
    model = exporter.for_model("m")
    model.inc("batchd_request", label="completed")
    model.inc("batchd_batch_real_tokens", np.int64(0))  # Ray refuses inc(0) and numpy numbers
    model.inc("batchd_batch_padded_tokens", np.int64(12))
    model.observe("batchd_batch_size", np.int64(8))
    readings = []
    model.track("batchd_queue_size", lambda: readings.append(1) or 3)
    model.track("batchd_engine_state", lambda: {"ready": 1.0, "dead": 0.0})
    exporter.push()
    assert readings == [1]


async def test_a_client_that_went_away_is_not_retried_nor_answered():
    calls, sent = [], []

    async def proxy(scope, receive, send):  # waits for the replica, sees the client leave: no answer
        calls.append((await receive())["body"])
        assert (await receive())["type"] == "http.disconnect"

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await RetryLostReplica(proxy, backoff_s=0)({"type": "http", "method": "POST", "headers": []}, receive, send)
    assert calls == [b"{}"] and sent == []


async def test_a_replica_that_dies_between_headers_and_body_is_retried_not_cut():
    calls = []

    async def proxy(scope, receive, send):
        await receive()
        calls.append(1)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if len(calls) == 1:
            return  # the replica died after its headers: Ray's proxy sends nothing more
        await send({"type": "http.response.body", "body": b"whole"})

    response = await _post(RetryLostReplica(proxy, backoff_s=0), b"{}")
    assert response.status_code == 200 and response.content == b"whole" and len(calls) == 2


async def test_the_replica_takes_the_body_from_the_scope_and_never_calls_back_to_the_proxy():
    import asyncio

    got, asked = [], []

    async def app(scope, receive, send):
        got.append(await receive())
        got.append(await receive())  # batchd's disconnect watch: waits until Ray cancels the request

    async def ray_receive():
        asked.append(1)
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(BodyFromScope(app)({"type": "http", BODY_KEY: b'{"input": "x"}'}, ray_receive, None))
    await asyncio.sleep(0.05)
    assert got == [{"type": "http.request", "body": b'{"input": "x"}', "more_body": False}] and not task.done()
    task.cancel()  # Ray cancels a request whose client left
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asked == []
