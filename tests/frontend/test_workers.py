"""`server.workers = 2`: two front-end processes and one engine process behind one port, against real
processes (fake backends, so it is fast). What holds for one process holds across the boundary:
correct vectors from every worker, chat streams, 429/504 decided by the engine, a client's disconnect
cancels its inputs in the engine, /stats and /metrics for the whole server, the API key; a killed
front end is restarted, and an engine that dies makes every front end answer 503. SIGTERM drains
every process and exits 0."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from batchd.backends.fake import FakeBackend
from batchd.config import load_config
from batchd.testing import ServerProcess

pytestmark = pytest.mark.slow
KEY = "sekrit"
AUTH = {"authorization": f"Bearer {KEY}"}
CONFIG = f"""
[server]
workers = 2
api_key = "{KEY}"
request_timeout_s = 60
drain_timeout_s = 30

[[models]]
name = "fast"
backend = "fake"
fake_dim = 16

[[models]]
name = "slow"            # one input per batch, 400 ms a batch: inputs queue and wait
backend = "fake"
fake_batch_ms = 400
[models.batching]
max_batch_size = 1
max_inflight_batches = 1
max_wait_ms = 0
max_queue = 3

[[models]]
name = "chat"
backend = "fake"
task = "generate"
max_length = 512
fake_batch_ms = 10
[models.batching]
buckets = [512]
"""


def children(pid: int) -> dict[str, list[int]]:
    """The supervisor's children by role: {"engine": [pid], "front": [pid, pid]}."""
    out: dict[str, list[int]] = {"engine": [], "front": []}
    for tid in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            out["engine" if b"engine_server" in cmd else "front"].append(int(child))
    return out


def wait_until(predicate, timeout: float = 20, what: str = "condition"):
    give_up = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CONFIG)
    try:
        with ServerProcess.batchd(config=f.name, name="batchd-workers") as srv:
            srv.wait_ready(60)
            yield srv
    finally:
        os.unlink(f.name)


def client(srv: ServerProcess, connections: int | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections) if connections else httpx.Limits()
    return httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=60, limits=limits)


async def stats_until(c: httpx.AsyncClient, predicate, what: str, timeout: float = 20) -> dict:
    give_up = time.monotonic() + timeout
    while True:
        try:
            stats = (await c.get("/stats")).json()
        except httpx.TransportError:  # this client's connection was on a front end that was killed
            stats = None
        if stats is not None and predicate(stats):
            return stats
        assert time.monotonic() < give_up, f"timed out waiting for {what}: {stats}"
        await asyncio.sleep(0.02)


def slow_stats(stats: dict) -> dict:
    return stats["models"]["slow"]


def test_vectors_are_right_from_every_worker_and_stats_cover_the_whole_server(server):
    config = load_config(None, ["model.backend=fake", "model.fake_dim=16"])
    reference = FakeBackend(config.model)
    reference.load()
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(60)]
    expected, _ = reference.embed(reference.tokenize(texts, False))

    async def scenario() -> tuple[list[httpx.Response], dict]:
        async with client(server) as c:
            await c.post("/stats/reset")
            # a fresh connection per request: the kernel hands connections to both front ends
            async def one(i: int) -> httpx.Response:
                async with client(server) as fresh:
                    fmt = "base64" if i % 2 else "float"
                    return await fresh.post("/v1/embeddings", json={"input": [texts[i], texts[-1 - i]],
                                                                   "model": "fast", "encoding_format": fmt})
            responses = await asyncio.gather(*(one(i) for i in range(len(texts))))
            return responses, (await c.get("/stats")).json()

    responses, stats = asyncio.run(scenario())
    instances = set()
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        instances.add(r.headers["x-batchd-instance"])
        data = r.json()["data"]
        got = [np.frombuffer(__import__("base64").b64decode(d["embedding"]), dtype="<f4") if i % 2
               else np.asarray(d["embedding"], dtype=np.float32) for d in data]
        np.testing.assert_array_equal(got[0], expected[i])
        np.testing.assert_array_equal(got[1], expected[len(texts) - 1 - i])
    assert len(instances) == 2, f"one front end answered everything: {instances}"
    fast = stats["models"]["fast"]
    assert fast["requests_total"] == len(texts) and fast["inputs_total"] == 2 * len(texts)
    assert fast["outcomes"]["completed"] == len(texts)


def test_api_key_and_error_shapes(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as anon, client(server) as c:
            r = await anon.post("/v1/embeddings", json={"input": "x", "model": "fast"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await anon.get("/health")).status_code == 200  # /health and /metrics stay open
            r = await c.post("/v1/embeddings", json={"input": [], "model": "fast"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "input"
            r = await c.post("/v1/embeddings", json={"input": "x", "model": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await c.get("/metrics")
            assert r.status_code == 200
            # refusals in a front end are counted by the engine, responses by status too
            await asyncio.sleep(0.3)  # front ends flush their response counts every 0.2 s
            text = (await c.get("/metrics")).text
            assert 'batchd_request_failure_total{model="fast",reason="invalid_value"}' in text
            assert 'batchd_http_responses_total{model="fast",status="400"}' in text
    asyncio.run(scenario())


def test_chat_streams_across_the_boundary(server):
    async def scenario():
        async with client(server) as c:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hello there you"}],
                    "max_tokens": 12, "ignore_eos": True}
            whole = await c.post("/v1/chat/completions", json=body)
            assert whole.status_code == 200, whole.text
            text = whole.json()["choices"][0]["message"]["content"]
            deltas, finish, usage = [], None, None
            async with c.stream("POST", "/v1/chat/completions",
                                json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            for line in lines[:-1]:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    deltas.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
            assert "".join(deltas) == text and finish == "length"
            assert usage["completion_tokens"] == 12
            assert len([d for d in deltas if d]) > 1  # per-step deltas, not one lump
    asyncio.run(scenario())


def test_generation_disconnect_frees_the_sequence_in_the_engine(server):
    async def scenario():
        async with client(server) as c:
            await c.post("/stats/reset")
            body = {"model": "chat", "prompt": "a b c", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with client(server) as leaver:
                async with leaver.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # the first token came; now the client goes away
            stats = await stats_until(c, lambda s: s["models"]["chat"]["outcomes"]["cancelled"] == 1
                                      and s["models"]["chat"]["num_requests_running"] == 0,
                                      what="cancel reached the engine and the sequence left at the next step")
            assert stats["models"]["chat"]["generation_tokens"] < 400
    asyncio.run(scenario())


def test_disconnect_cancels_queued_inputs_in_the_engine(server):
    async def scenario():
        async with client(server) as c, client(server) as leaver:
            await c.post("/stats/reset")
            running = asyncio.create_task(c.post("/v1/embeddings", json={"input": "running", "model": "slow"}))
            await stats_until(c, lambda s: slow_stats(s)["inflight_batches"] == 1, what="first batch running")
            queued = asyncio.create_task(leaver.post("/v1/embeddings", json={"input": "q " * 10, "model": "slow"}))
            await stats_until(c, lambda s: slow_stats(s)["queue_depth"] == 1, what="second input queued")
            queued.cancel()  # httpx closes the connection: the front end tells the engine
            await asyncio.gather(queued, return_exceptions=True)
            stats = await stats_until(c, lambda s: slow_stats(s)["outcomes"]["cancelled"] == 1, what="cancelled")
            assert slow_stats(stats)["queue_depth"] == 0
            assert (await running).status_code == 200
            stats = await stats_until(c, lambda s: slow_stats(s)["inflight_batches"] == 0, what="idle")
            assert slow_stats(stats)["real_tokens"] == 3  # "running" ran; the 12 tokens of the leaver did not
    asyncio.run(scenario())


def test_queue_full_and_deadlines_are_decided_by_the_engine(server):
    async def scenario():
        async with client(server) as c:
            await c.post("/stats/reset")
            # one running + three queued (max_queue = 3) fill it, whichever front end they came through
            async def fresh_post(i: int) -> httpx.Response:
                async with client(server) as f:
                    return await f.post("/v1/embeddings", json={"input": f"job {i}", "model": "slow"})
            # the first must be running before the others come, or all four race for three queue places
            jobs = [asyncio.create_task(fresh_post(0))]
            await stats_until(c, lambda s: slow_stats(s)["inflight_batches"] == 1, what="the first running")
            jobs += [asyncio.create_task(fresh_post(i)) for i in range(1, 4)]
            await stats_until(c, lambda s: slow_stats(s)["requests_total"] == 4, what="4 accepted")
            refused = await c.post("/v1/embeddings", json={"input": "one more", "model": "slow"})
            assert refused.status_code == 429 and refused.json()["error"]["code"] in ("queue_full",
                                                                                        "deadline_unmeetable")
            assert int(refused.headers["retry-after"]) >= 1
            assert [r.status_code for r in await asyncio.gather(*jobs)] == [200] * 4
            late = await c.post("/v1/embeddings", json={"input": "w " * 50, "model": "slow"},
                                headers={"x-request-timeout": "0.05"})
            assert late.status_code in (429, 504), late.text
            stats = (await c.get("/stats")).json()
            assert slow_stats(stats)["rejections"].get("queue_full", 0) + \
                slow_stats(stats)["rejections"].get("deadline_unmeetable", 0) >= 1
    asyncio.run(scenario())


def test_a_killed_front_end_is_restarted_and_its_requests_fail_cleanly(server):
    async def scenario() -> int:
        async with client(server, connections=1) as victim, client(server) as c:
            await c.post("/stats/reset")
            first = await victim.post("/v1/embeddings", json={"input": "who", "model": "fast"})
            pid = int(first.headers["x-batchd-instance"].rsplit(":", 1)[1])
            assert pid in children(server.proc.pid)["front"]
            # the next request rides the same keep-alive connection, so the same front end holds it
            inflight = asyncio.create_task(victim.post("/v1/embeddings", json={"input": "a b c", "model": "slow"}))
            await stats_until(c, lambda s: slow_stats(s)["requests_total"] == 1, what="accepted")
            os.kill(pid, signal.SIGKILL)
            result = (await asyncio.gather(inflight, return_exceptions=True))[0]
            assert isinstance(result, httpx.TransportError), result  # the connection closed; no hang
            await stats_until(c, lambda s: slow_stats(s)["outcomes"]["cancelled"] == 1
                              and slow_stats(s)["queue_depth"] == 0 and slow_stats(s)["inflight_batches"] == 0,
                              what="its request cancelled in the engine")
            return pid

    killed = asyncio.run(scenario())
    fronts = wait_until(lambda: (lambda f: f if len(f) == 2 and killed not in f else None)(
        children(server.proc.pid)["front"]), what="a new front end")
    assert killed not in fronts
    wait_until(lambda: server.get("/health")[0] == 200, what="healthy again")


def test_an_engine_that_dies_makes_every_front_end_answer_503(server):
    """Last in this module: the server is left without an engine."""
    engine = children(server.proc.pid)["engine"][0]
    os.kill(engine, signal.SIGKILL)

    async def scenario():
        for _ in range(6):  # fresh connections reach both front ends
            async with client(server) as c:
                r = await c.post("/v1/embeddings", json={"input": "x", "model": "fast"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
                h = await c.get("/health")
                assert h.status_code == 503 and h.json()["status"] == "dead"
    wait_until(lambda: server.get("/health")[0] == 503, what="front ends notice")
    asyncio.run(scenario())
    # the supervisor gives its children drain_timeout_s + 15 s before it kills them: wait past that
    assert server.stop(timeout=60) == 1  # the engine did not exit cleanly, and the exit status says so


def test_sigterm_drains_every_process_and_exits_0():
    overrides = ["server.workers=2", "model.backend=fake", "model.name=fake", "batching.max_batch_size=1",
                 "batching.max_inflight_batches=1", "batching.max_wait_ms=0", "model.fake_batch_ms=300",
                 "server.drain_timeout_s=30"]
    with ServerProcess.batchd(overrides, config=None).wait_ready(60) as srv:
        pids = children(srv.proc.pid)

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                accepted = [asyncio.create_task(c.post("/v1/embeddings", json={"input": f"job {i}"}))
                            for i in range(4)]
                await stats_until(c, lambda s: s["requests_total"] == 4, what="4 accepted")
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)  # the signal travels supervisor -> engine (a request sent in
                # the same instant may still be accepted, and then it is answered 200 before the exit)
                give_up = time.monotonic() + 10
                while True:  # new work is refused while the accepted work still runs
                    r = await c.post("/v1/embeddings", json={"input": "too late"})
                    if r.status_code == 503:
                        break
                    assert r.status_code == 200 and time.monotonic() < give_up
                assert r.json()["error"]["code"] == "shutting_down"
                assert (await c.get("/health")).json()["status"] == "draining"
                responses = await asyncio.gather(*accepted)
                assert [x.status_code for x in responses] == [200] * 4

        asyncio.run(scenario())
        assert srv.proc.wait(timeout=30) == 0
        for pid in [*pids["engine"], *pids["front"]]:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
