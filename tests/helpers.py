"""Shared test helpers: configs, an in-process app with a fake or real engine, a real server process."""
from __future__ import annotations

import asyncio
import subprocess
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

import httpx

from batchd.api.app import create_app
from batchd.config import Config, config_from_dict
from batchd.engine import Engine, make_engine
from batchd.testing import ROOT, ServerProcess

__all__ = ["ROOT", "app_client", "fake_config", "make_config", "running_engine", "server_process", "stats_until"]


def make_config(**sections: dict[str, Any]) -> Config:
    """A config from section dicts, e.g. make_config(model={"backend": "fake"}, batching={...})."""
    return config_from_dict({k: v for k, v in sections.items()})


def fake_config(model: dict | None = None, batching: dict | None = None, server: dict | None = None) -> Config:
    return make_config(model={"backend": "fake", "name": "fake", **(model or {})},
                       batching=batching or {}, server=server or {})


@asynccontextmanager
async def running_engine(config: Config) -> AsyncIterator[Engine]:
    engine = make_engine(config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@asynccontextmanager
async def app_client(config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    """An httpx client talking to the app in-process (no sockets), with a started engine."""
    async with running_engine(config) as engine:
        app = create_app(config, engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batchd.test", timeout=60) as client:
            yield client, engine


@contextmanager
def server_process(*overrides: str, config: str | None = "config.toml",
                   env: dict[str, str] | None = None, ready_timeout: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `python -m batchd serve` process on a free 127.0.0.1 port, ready (/health 200)."""
    with ServerProcess.batchd(overrides, config=config, env=env) as server:
        server.wait_ready(ready_timeout)
        yield server.proc, server.url


async def stats_until(client: httpx.AsyncClient, predicate, timeout: float = 20, what: str = "condition") -> dict:
    """Poll /stats until `predicate(stats)` holds; fail naming `what` after `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        stats = (await client.get("/stats")).json()
        if predicate(stats):
            return stats
        assert time.monotonic() < give_up, f"timed out waiting for {what}: {stats}"
        await asyncio.sleep(0.01)
