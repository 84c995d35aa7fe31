"""Admission, deadlines and supervision of the generation engine, with the fake generation backend
(deterministic tokens, a sleep per step) behind the real app in-process."""
from __future__ import annotations

import asyncio
import logging

import pytest

from tests.helpers import app_client, make_config

CHAT = "/v1/chat/completions"


def fake_gen_config(**generation):
    return make_config(server={"request_timeout_s": 30}, models=[{
        "name": "gen", "backend": "fake", "task": "generate", "max_length": 256, "fake_batch_ms": 20,
        "generation": {"max_running_seqs": 1, "max_queue": 1, **generation}}])


def body(n: int = 20, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": n, "ignore_eos": True, **extra}


async def test_a_full_queue_answers_429_and_what_was_accepted_still_finishes():
    async with app_client(fake_gen_config()) as (client, engine):
        running = asyncio.create_task(client.post(CHAT, json=body(30)))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(client.post(CHAT, json=body(5)))
        await asyncio.sleep(0.05)
        refused = await client.post(CHAT, json=body(5))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert "retry-after" in refused.headers
        done = await asyncio.gather(running, waiting)
        assert [r.status_code for r in done] == [200, 200]
        assert [r.json()["usage"]["completion_tokens"] for r in done] == [30, 5]
        stats = (await client.get("/stats")).json()
        assert stats["rejections"] == {"queue_full": 1} and stats["outcomes"]["completed"] == 2


async def test_no_first_token_before_the_deadline_is_504_and_the_sequence_never_runs():
    async with app_client(fake_gen_config(max_queue=8)) as (client, engine):
        running = asyncio.create_task(client.post(CHAT, json=body(40)))
        await asyncio.sleep(0.1)
        late = await client.post(CHAT, json=body(5), headers={"x-request-timeout": "0.2"})
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        assert (await running).status_code == 200
        snap = (await client.get("/stats")).json()
        assert snap["outcomes"]["timed_out"] == 1 and snap["generation_tokens"] == 40


async def test_stream_is_server_sent_events_in_openai_shape():
    async with app_client(fake_gen_config()) as (client, engine):
        async with client.stream("POST", CHAT, json=body(4, stream=True, stream_options={"include_usage": True})) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line async for line in r.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    import json
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text.split() == ["w" + w for w in text.replace("w", " ").split()]  # four fake words
    assert len(text.split()) == 4


@pytest.mark.parametrize("kind", ["embed", "generate"])
async def test_a_scheduler_loop_that_dies_kills_its_engine_fast_and_loudly(kind, caplog):
    """Supervision: a bug in a scheduler loop must not hang requests until their deadline."""
    if kind == "embed":
        config = make_config(server={"request_timeout_s": 30}, models=[{"name": "fake", "backend": "fake"}])
        url, payload = "/v1/embeddings", {"input": "hello"}
    else:
        config, url, payload = fake_gen_config(), CHAT, body(5)
    async with app_client(config) as (client, engine):
        task = engine.scheduler if kind == "embed" else engine.task

        def broken(now):
            raise RuntimeError("bug in the planner")

        task.plan = broken
        with caplog.at_level(logging.ERROR):
            r = await asyncio.wait_for(client.post(url, json=payload), timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert (await client.post(url, json=payload)).status_code == 503
        assert sum("scheduler of" in rec.message for rec in caplog.records) == 1  # logged once
