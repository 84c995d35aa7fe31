"""Graceful shutdown of a real `batchd serve` process (fake backend, so it is fast): on SIGTERM or
SIGINT it stops accepting (503), finishes what it accepted, and exits 0."""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.helpers import server_process, stats_until

pytestmark = pytest.mark.slow

FAKE = ("model.backend=fake", "model.name=fake", "batching.max_batch_size=1", "batching.max_inflight_batches=1",
        "batching.max_wait_ms=0")



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_accepted_work_refuses_new_and_exits_0(sig):
    with server_process(*FAKE, "model.fake_batch_ms=300", "server.drain_timeout_s=30", config=None) as (proc, base):
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                accepted = [asyncio.create_task(client.post("/v1/embeddings", json={"input": f"job {i}"}))
                            for i in range(4)]
                await stats_until(client, lambda s: s["requests_total"] == 4, what="4 accepted")
                proc.send_signal(sig)
                # new work is refused while the accepted work still runs
                give_up = time.monotonic() + 10
                while True:
                    r = await client.post("/v1/embeddings", json={"input": "too late"})
                    if r.status_code == 503:
                        break
                    assert r.status_code == 200 and time.monotonic() < give_up
                assert r.json()["error"]["code"] == "shutting_down"
                health = await client.get("/health")
                assert health.status_code == 503 and health.json()["status"] == "draining"
                responses = await asyncio.gather(*accepted)
                assert [x.status_code for x in responses] == [200] * 4
                assert all(len(x.json()["data"]) == 1 for x in responses)
        asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0


def test_drain_timeout_bounds_shutdown():
    """Accepted work that cannot finish within drain_timeout_s does not keep the process alive: the
    unfinished requests are answered 503 shutting_down (not cut off), and the process exits 0."""
    with server_process(*FAKE, "model.fake_batch_ms=1500", "server.drain_timeout_s=0.5", config=None) as (proc, base):
        async def scenario() -> list:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                accepted = [asyncio.create_task(client.post("/v1/embeddings", json={"input": f"job {i}"}))
                            for i in range(4)]
                await stats_until(client, lambda s: s["requests_total"] == 4, what="4 accepted")
                proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(*accepted, return_exceptions=True), timeout=30)
        results = asyncio.run(scenario())
        assert proc.wait(timeout=30) == 0
        assert all(isinstance(r, httpx.Response) for r in results), results
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 503} and codes.count(503) >= 2, codes  # 4 x 1.5 s cannot fit in 0.5 s
        assert {r.json()["error"]["code"] for r in results if r.status_code == 503} == {"shutting_down"}
