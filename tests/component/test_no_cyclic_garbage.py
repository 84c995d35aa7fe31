"""The request path makes no reference cycles: with hundreds of requests in flight every cycle is
work for the garbage collector (a cycle per request once cost more CPU than the rest of a request).
Requests wait past the disconnect watch's start, so the watch task is started and cancelled too."""
from __future__ import annotations

import asyncio
import gc
import json

from batchd.api.app import create_app
from batchd.api.routes import DisconnectWatch
from tests.helpers import fake_config, running_engine

BODY = json.dumps({"input": "a few words of text", "model": "fake"}).encode()


async def _one(app, statuses: list[int]) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent = False
    connection_open = asyncio.get_running_loop().create_future()  # never resolved: the client stays

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await connection_open
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)


def _ours(obj: object) -> bool:
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
    if code is not None:
        return "/batchd/" in code.co_filename
    return type(obj).__module__.startswith("batchd.")


async def test_requests_leave_no_cyclic_garbage():
    wait_s = DisconnectWatch.WATCH_AFTER_S + 0.1
    config = fake_config(model={"fake_batch_ms": wait_s * 1e3}, batching={"max_wait_ms": 0})
    async with running_engine(config) as engine:
        app = create_app(config, engine)
        statuses: list[int] = []
        await asyncio.gather(*(_one(app, statuses) for _ in range(8)))  # warm: lazy imports, caches
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await asyncio.gather(*(_one(app, statuses) for _ in range(24)))
            gc.collect()
            ours = [type(o).__qualname__ for o in gc.garbage if _ours(o)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert statuses == [200] * 32
    assert ours == [], f"reference cycles left by the request path: {sorted(set(ours))}"
