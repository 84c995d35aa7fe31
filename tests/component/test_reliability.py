"""Reliability promises of the engine and API, in-process with the fake backend: admission and
overload (429 + Retry-After, nothing queued dropped), deadlines (504, never run), client disconnects
(dropped from queue and from formed batches), failing batches (bisection, OOM, engine death), and
not-ready/draining answers. A gate holds the model thread inside a batch so that what is queued,
formed or running is known, not guessed from timing."""
from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Callable

import httpx
import numpy as np
import pytest

from batchd.api.app import create_app
from batchd.engine import Engine, make_engine
from batchd.errors import ClientDisconnected, DeadlineExceeded, Overloaded
from tests.helpers import app_client, fake_config, running_engine

URL = "/v1/embeddings"


class Gate:
    """Wraps the backend's embed: every forward call blocks until `open()` (or `release(n)` calls)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._orig = engine.backend.embed
        self._sem = threading.Semaphore(0)
        self._opened = threading.Event()
        self.entered = 0  # forward calls that reached the gate
        engine.backend.embed = self._embed  # type: ignore[method-assign]

    def _embed(self, batch):
        self.entered += 1
        while not self._opened.is_set():
            if self._sem.acquire(timeout=0.01):
                break
        return self._orig(batch)

    def open(self) -> None:
        self._opened.set()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for a state change of the engine (a liveness bound, not a timing assertion)."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def ids(*tokens: int) -> np.ndarray:
    """A token-id row as the engine takes it: BOS, tokens, EOS (all >= 10, so no magic ids)."""
    return np.asarray([1, *tokens, 2], dtype=np.int64)


def seen_count(engine: Engine, row: np.ndarray) -> int:
    return engine.backend.seen.count(tuple(row.tolist()))  # type: ignore[attr-defined]


def text_row(engine: Engine, text: str) -> tuple[int, ...]:
    return tuple(engine.backend.tokenize([text], False)[0].tolist())


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def serial(**batching) -> dict:
    """One batch at a time, one input per batch, no waiting: queue contents stay put."""
    return {"max_inflight_batches": 1, "max_batch_size": 1, "max_wait_ms": 0, **batching}


# ---- admission and overload ---------------------------------------------------------------------
async def test_full_queue_is_429_at_once_with_retry_after_and_keeps_what_is_queued():
    async with app_client(fake_config(batching=serial(max_queue=4))) as (client, engine):
        gate = Gate(engine)
        running = asyncio.create_task(client.post(URL, json={"input": "r0"}))
        await until(lambda: gate.entered == 1, what="first batch in the model")
        queued = [asyncio.create_task(client.post(URL, json={"input": f"q{i}"})) for i in range(4)]
        await until(lambda: engine.queue.depth == 4, what="queue full")
        engine.scheduler.cost.observe(1000, 1000, 100.0)  # a measured drain rate: 10 real tokens/s
        tokens = engine.queue.tokens + engine.scheduler.inflight_tokens  # all the work ahead

        r = await client.post(URL, json={"input": "late"})
        assert r.status_code == 429
        err = error_of(r)
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert "queue full" in err["message"] and "max_queue=4" in err["message"]
        assert r.headers["retry-after"] == str(math.ceil(tokens / 10))
        # all or nothing: a request with more inputs than room is refused whole
        assert (await client.post(URL, json={"input": ["x", "y"]})).status_code == 429
        assert engine.queue.depth == 4  # nothing queued was dropped to make room

        gate.open()
        results = await asyncio.gather(running, *queued)
        assert [r.status_code for r in results] == [200] * 5
        seen = engine.backend.seen
        assert all(text_row(engine, t) in seen for t in ["r0", "q0", "q1", "q2", "q3"])
        assert text_row(engine, "late") not in seen and text_row(engine, "x") not in seen
        stats = (await client.get("/stats")).json()
        assert stats["rejections"] == {"queue_full": 2}
        assert stats["outcomes"]["completed"] == 5 and stats["requests_total"] == 5
        metrics = (await client.get("/metrics")).text
        assert 'batchd_request_failure_total{model="fake",reason="queue_full"} 2.0' in metrics


async def test_deadline_that_cannot_be_met_is_refused_at_admission():
    async with app_client(fake_config(batching=serial(max_queue=100))) as (client, engine):
        gate = Gate(engine)
        running = asyncio.create_task(client.post(URL, json={"input": "r0"}))
        await until(lambda: gate.entered == 1)
        queued = [asyncio.create_task(client.post(URL, json={"input": f"q{i}"})) for i in range(4)]
        await until(lambda: engine.queue.depth == 4)
        engine.scheduler.cost.observe(1000, 1000, 100.0)  # 10 tokens/s: 12 queued + 3 new need 1.5 s

        r = await client.post(URL, json={"input": "hurry"}, headers={"x-request-timeout": "1"})
        assert r.status_code == 429
        assert error_of(r)["code"] == "deadline_unmeetable"
        assert int(r.headers["retry-after"]) >= 1
        patient = asyncio.create_task(client.post(URL, json={"input": "patient"}, headers={"x-request-timeout": "20"}))
        await until(lambda: engine.queue.depth == 5, what="the patient request queued")

        gate.open()
        results = await asyncio.gather(running, patient, *queued)
        assert [r.status_code for r in results] == [200] * 6
        assert text_row(engine, "hurry") not in engine.backend.seen
        assert engine.stats.rejections["deadline_unmeetable"] == 1


async def test_deadline_admission_counts_the_batches_already_handed_to_the_model():
    """Work formed into batches is no longer queued but still ahead of a new request."""
    async with running_engine(fake_config(batching=serial(max_inflight_batches=2))) as engine:
        gate = Gate(engine)
        running = asyncio.create_task(engine.embed([ids(100, 101, 102, 103)], time.monotonic() + 30))
        await until(lambda: gate.entered == 1)
        formed = asyncio.create_task(engine.embed([ids(200, 201, 202, 203)], time.monotonic() + 30))
        await until(lambda: engine.scheduler.inflight == 2 and engine.queue.depth == 0)
        engine.scheduler.cost.observe(1000, 1000, 100.0)  # 10 tokens/s: 6 + 6 in flight + 3 new need 1.5 s
        try:
            await engine.embed([ids(300)], time.monotonic() + 1.0)
            raise AssertionError("admitted a request whose deadline cannot be met")
        except Overloaded as exc:
            assert exc.code == "deadline_unmeetable"
            assert int(exc.headers["Retry-After"]) >= 1
        gate.open()
        await asyncio.gather(running, formed)
        assert seen_count(engine, ids(300)) == 0


async def test_deadline_admission_counts_the_rest_of_the_batch_under_load_not_when_idle():
    """A batch answers as a whole, so under load the inputs that will share it count; idle, they don't."""
    config = fake_config(batching={"max_batch_size": 4, "max_inflight_batches": 1, "max_wait_ms": 0})
    async with running_engine(config) as engine:
        gate = Gate(engine)
        engine.scheduler.cost.observe(1000, 1000, 100.0)  # 10 tokens/s
        # idle: 3 tokens need 0.3 s, so a 0.5 s deadline is admitted (refused if later arrivals counted)
        idle = asyncio.create_task(engine.embed([ids(100)], time.monotonic() + 0.5))
        await until(lambda: gate.entered == 1, what="the idle request admitted and running")
        queued = [asyncio.create_task(engine.embed([ids(200 + i)], time.monotonic() + 30)) for i in range(2)]
        await until(lambda: engine.queue.depth == 2)
        # 9 tokens ahead + 3 mine = 1.2 s, but the batch that carries mine also carries up to 9 more: 2.1 s
        try:
            await engine.embed([ids(300)], time.monotonic() + 1.5)
            raise AssertionError("admitted a request whose batch cannot finish by its deadline")
        except Overloaded as exc:
            assert exc.code == "deadline_unmeetable"
        gate.open()
        results = await asyncio.gather(idle, *queued, return_exceptions=True)
        assert isinstance(results[0], (list, DeadlineExceeded))  # admitted: served, or timed out behind the gate
        assert all(isinstance(r, list) for r in results[1:])
        assert seen_count(engine, ids(300)) == 0


# ---- deadlines ----------------------------------------------------------------------------------
async def test_request_past_its_deadline_gets_504_leaves_the_queue_and_never_runs():
    async with app_client(fake_config(batching=serial())) as (client, engine):
        gate = Gate(engine)
        running = asyncio.create_task(client.post(URL, json={"input": "r0"}))
        await until(lambda: gate.entered == 1)
        r = await client.post(URL, json={"input": ["late1", "late2"]}, headers={"x-request-timeout": "0.2"})
        assert r.status_code == 504
        assert error_of(r)["code"] == "deadline_exceeded"
        assert engine.queue.depth == 0  # removed at once, not left for the scheduler to find
        gate.open()
        assert (await running).status_code == 200
        assert (await client.post(URL, json={"input": "after"})).status_code == 200
        seen = engine.backend.seen
        assert text_row(engine, "late1") not in seen and text_row(engine, "late2") not in seen
        assert engine.stats.outcomes["timed_out"] == 1 and engine.stats.outcomes["completed"] == 2


async def test_config_timeout_applies_and_header_only_shortens_it():
    async with app_client(fake_config(batching=serial(), server={"request_timeout_s": 0.2})) as (client, engine):
        gate = Gate(engine)
        running = asyncio.create_task(client.post(URL, json={"input": "r0"}, headers={"x-request-timeout": "60"}))
        await until(lambda: gate.entered == 1)
        r = await client.post(URL, json={"input": "waits"}, headers={"x-request-timeout": "60"})  # capped at 0.2
        assert r.status_code == 504
        gate.open()
        assert (await running).status_code == 504  # the model was held past its 0.2 s too
        assert text_row(engine, "waits") not in engine.backend.seen


async def test_expired_input_in_a_formed_batch_is_skipped_by_the_model():
    # a full batch (2 inputs) is formed and handed to the model thread beside the running one
    config = fake_config(batching={"max_inflight_batches": 2, "max_wait_ms": 0, "max_batch_size": 2})
    async with running_engine(config) as engine:
        gate = Gate(engine)
        first = asyncio.create_task(engine.embed([ids(100)], time.monotonic() + 30))
        await until(lambda: gate.entered == 1)
        late = asyncio.create_task(engine.embed([ids(200), ids(201)], time.monotonic() + 0.3))
        await until(lambda: engine.scheduler.inflight == 2 and engine.queue.depth == 0, what="second batch formed")
        try:
            await late
            raise AssertionError("expected a deadline error")
        except DeadlineExceeded:
            pass
        gate.open()
        await first
        await until(lambda: engine.scheduler.inflight == 0)
        assert seen_count(engine, ids(100)) == 1
        assert seen_count(engine, ids(200)) == 0 and seen_count(engine, ids(201)) == 0


# ---- disconnects --------------------------------------------------------------------------------
async def test_disconnected_client_inputs_are_dropped_from_the_queue():
    async with running_engine(fake_config(batching=serial())) as engine:
        gate = Gate(engine)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(engine.embed([ids(100)], time.monotonic() + 30))
        await until(lambda: gate.entered == 1)
        gone = loop.create_future()
        leaver = asyncio.create_task(engine.embed([ids(300), ids(301), ids(302)], time.monotonic() + 30, gone))
        stayer = asyncio.create_task(engine.embed([ids(400)], time.monotonic() + 30, loop.create_future()))
        await until(lambda: engine.queue.depth == 4)
        gone.set_result(None)
        with pytest.raises(ClientDisconnected):
            await leaver
        assert engine.queue.depth == 1
        gate.open()
        await first
        assert len(await stayer) == 1
        assert all(seen_count(engine, ids(t)) == 0 for t in (300, 301, 302))
        assert seen_count(engine, ids(400)) == 1
        assert engine.stats.outcomes["cancelled"] == 1 and engine.stats.outcomes["completed"] == 2


async def test_disconnected_client_inputs_are_dropped_from_a_formed_batch():
    # leaver (2 inputs) + stayer (1) fill a batch of 3: formed and handed over beside the running one
    config = fake_config(batching={"max_inflight_batches": 2, "max_wait_ms": 0, "max_batch_size": 3})
    async with running_engine(config) as engine:
        gate = Gate(engine)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(engine.embed([ids(100)], time.monotonic() + 30))
        await until(lambda: gate.entered == 1)
        gone = loop.create_future()
        leaver = asyncio.create_task(engine.embed([ids(300), ids(301)], time.monotonic() + 30, gone))
        stayer = asyncio.create_task(engine.embed([ids(400)], time.monotonic() + 30, loop.create_future()))
        await until(lambda: engine.scheduler.inflight == 2 and engine.queue.depth == 0, what="second batch formed")
        gone.set_result(None)
        with pytest.raises(ClientDisconnected):
            await leaver
        gate.open()
        await first
        assert len(await stayer) == 1
        await until(lambda: engine.scheduler.inflight == 0)
        assert seen_count(engine, ids(300)) == 0 and seen_count(engine, ids(301)) == 0
        assert seen_count(engine, ids(400)) == 1


async def test_cancelled_caller_task_also_drops_its_inputs():
    async with running_engine(fake_config(batching=serial())) as engine:
        gate = Gate(engine)
        first = asyncio.create_task(engine.embed([ids(100)], time.monotonic() + 30))
        await until(lambda: gate.entered == 1)
        victim = asyncio.create_task(engine.embed([ids(500)], time.monotonic() + 30))
        await until(lambda: engine.queue.depth == 1)
        victim.cancel()
        await asyncio.gather(victim, return_exceptions=True)
        assert engine.queue.depth == 0 and engine.active_requests == 1
        gate.open()
        await first
        assert seen_count(engine, ids(500)) == 0
        assert engine.stats.outcomes["cancelled"] == 1


# ---- failing batches ----------------------------------------------------------------------------
async def _batch_behind_gate(client, engine, bodies: list[dict]) -> list[httpx.Response]:
    """Hold the model on a first request, queue `bodies` so they ride in one batch, then release."""
    gate = Gate(engine)
    first = asyncio.create_task(client.post(URL, json={"input": "opener"}))
    await until(lambda: gate.entered == 1)
    tasks = [asyncio.create_task(client.post(URL, json=b)) for b in bodies]
    n_inputs = sum(len(b["input"]) if isinstance(b["input"], list) else 1 for b in bodies)
    await until(lambda: engine.queue.depth == n_inputs, what="all queued")
    gate.open()
    assert (await first).status_code == 200
    return await asyncio.gather(*tasks)


async def test_poisonous_input_fails_alone_after_bisection():
    config = fake_config(batching={"max_inflight_batches": 1, "max_wait_ms": 0})
    async with app_client(config) as (client, engine):
        bodies = [{"input": f"good{i}"} for i in range(6)]
        bodies.insert(3, {"input": ["fine", "__poison__ pill"]})
        responses = await _batch_behind_gate(client, engine, bodies)
        codes = [r.status_code for r in responses]
        assert codes == [200, 200, 200, 500, 200, 200, 200]
        err = error_of(responses[3])
        assert err["code"] == "inference_failed" and err["type"] == "server_error"
        assert "poison" not in responses[3].text and "ValueError" not in responses[3].text
        for i in range(6):  # every good input ran exactly once, in the bisected batch
            assert engine.backend.seen.count(text_row(engine, f"good{i}")) == 1
        assert engine.backend.seen.count(text_row(engine, "fine")) == 1  # its neighbour ran too
        assert engine.stats.model_calls > engine.stats.batches_total  # the batch was split
        assert engine.state == "ready"
        assert (await client.post(URL, json={"input": "still fine"})).status_code == 200


async def test_out_of_memory_halves_the_batch_and_the_token_budget():
    config = fake_config(batching={"max_inflight_batches": 1, "max_wait_ms": 0, "max_batch_tokens": 4096})
    async with app_client(config) as (client, engine):
        bodies = [{"input": f"item{i}"} for i in range(7)] + [{"input": "__oom__ big"}]
        responses = await _batch_behind_gate(client, engine, bodies)
        assert [r.status_code for r in responses] == [200] * 8  # nobody fails: the halves fit
        assert engine.backend.seen.count(text_row(engine, "__oom__ big")) == 1
        assert 1 in engine.backend.batch_sizes
        assert engine.scheduler.params.max_batch_tokens == 2048
        assert engine.scheduler.base_params.max_batch_tokens == 4096
        # "for a while": once the back-off has passed, the next planning round restores the budget
        engine.scheduler._budget_restore_at = time.monotonic() - 1
        assert (await client.post(URL, json={"input": "later"})).status_code == 200
        assert engine.scheduler.params.max_batch_tokens == 4096


async def test_dead_engine_fails_everything_pending_fast_and_refuses_new_work():
    config = fake_config(batching=serial(max_inflight_batches=2), server={"request_timeout_s": 60})
    async with app_client(config) as (client, engine):
        gate = Gate(engine)
        fatal = asyncio.create_task(client.post(URL, json={"input": "__fatal__"}))
        await until(lambda: gate.entered == 1)
        formed = asyncio.create_task(client.post(URL, json={"input": "formed"}))
        await until(lambda: engine.scheduler.inflight == 2)
        queued = [asyncio.create_task(client.post(URL, json={"input": [f"w{i}", "x"]})) for i in range(5)]
        await until(lambda: engine.queue.depth == 10)
        gate.open()
        # "no caller waits forever": all answer well within their 60 s deadline
        responses = await asyncio.wait_for(asyncio.gather(fatal, formed, *queued), timeout=10)
        assert [r.status_code for r in responses] == [503] * 7
        assert {error_of(r)["code"] for r in responses} == {"engine_dead"}
        assert engine.state == "dead"
        health = await client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "dead", "failure": "FatalBackendError"}
        r = await client.post(URL, json={"input": "new"})
        assert r.status_code == 503 and error_of(r)["code"] == "engine_dead"
        assert text_row(engine, "formed") not in engine.backend.seen
        assert engine.queue.depth == 0 and engine.active_requests == 0
        stats = engine.stats
        assert stats.outcomes["failed"] == 7 and stats.requests_total == 7
        assert stats.rejections["engine_dead"] == 1


# ---- not ready, draining ------------------------------------------------------------------------
async def test_not_ready_is_503_until_the_model_is_loaded():
    config = fake_config()
    engine = make_engine(config)  # not started: still loading
    transport = httpx.ASGITransport(app=create_app(config, engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://batchd.test") as client:
        r = await client.post(URL, json={"input": "a"})
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        assert (await client.get("/health")).status_code == 503
        await engine.start()
        assert (await client.get("/health")).status_code == 200
        assert (await client.post(URL, json={"input": "a"})).status_code == 200
    await engine.close()


async def test_draining_refuses_new_work_and_finishes_accepted_work():
    async with app_client(fake_config(batching=serial())) as (client, engine):
        gate = Gate(engine)
        accepted = [asyncio.create_task(client.post(URL, json={"input": f"a{i}"})) for i in range(3)]
        await until(lambda: gate.entered == 1 and engine.queue.depth == 2)
        drained = asyncio.create_task(engine.drain(30))
        await until(lambda: engine.state == "draining")
        r = await client.post(URL, json={"input": "new"})
        assert r.status_code == 503 and error_of(r)["code"] == "shutting_down"
        assert (await client.get("/health")).status_code == 503
        gate.open()
        assert [r.status_code for r in await asyncio.gather(*accepted)] == [200] * 3
        assert await drained is True
        assert text_row(engine, "new") not in engine.backend.seen


async def test_drain_timeout_then_close_fails_the_leftovers_with_503():
    async with app_client(fake_config(batching=serial())) as (client, engine):
        gate = Gate(engine)
        accepted = [asyncio.create_task(client.post(URL, json={"input": f"a{i}"})) for i in range(3)]
        await until(lambda: gate.entered == 1 and engine.queue.depth == 2)
        assert await engine.drain(0.1) is False
        responses = await asyncio.wait_for(asyncio.gather(*accepted), timeout=10)
        gate.open()
        await engine.close()
        # told, not left waiting nor cut off: the unfinished ones get 503 shutting_down at the drain timeout
        assert [r.status_code for r in responses] == [503, 503, 503]
        assert {error_of(r)["code"] for r in responses} == {"shutting_down"}
        assert engine.stats.outcomes["failed"] == 3 and engine.active_requests == 0
        assert text_row(engine, "a1") not in engine.backend.seen  # the queued ones never ran
