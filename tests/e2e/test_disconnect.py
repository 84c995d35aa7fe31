"""Client disconnects against a real `batchd serve` process: an httpx request cancelled mid-flight
drops its inputs before the model runs them, from the queue and from a batch that is formed but not
started. The fake backend runs one input per batch, so /stats' token counts show exactly what ran."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.helpers import server_process, stats_until

pytestmark = pytest.mark.slow

FAKE = ("model.backend=fake", "model.name=fake", "batching.max_batch_size=1", "batching.max_inflight_batches=2",
        "batching.max_wait_ms=0", "model.fake_batch_ms=600")



def test_cancelled_clients_inputs_never_reach_the_model():
    with server_process(*FAKE, config=None) as (proc, base):
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client, \
                    httpx.AsyncClient(base_url=base, timeout=60) as leaver:
                # 1 word + BOS/EOS = 3 tokens each for the fake backend; the leavers have 8 and 10 words
                running = asyncio.create_task(client.post("/v1/embeddings", json={"input": "running"}))
                await stats_until(client, lambda s: s["inflight_batches"] == 1, what="first batch running")
                formed = asyncio.create_task(leaver.post("/v1/embeddings", json={"input": " ".join(["f"] * 8)}))
                await stats_until(client, lambda s: s["inflight_batches"] == 2 and s["queue_depth"] == 0,
                             what="second batch formed")
                queued = asyncio.create_task(leaver.post("/v1/embeddings", json={"input": " ".join(["q"] * 10)}))
                await stats_until(client, lambda s: s["queue_depth"] == 1, what="third input queued")
                formed.cancel()
                queued.cancel()  # the client goes away: httpx closes both connections
                await asyncio.gather(formed, queued, return_exceptions=True)
                stats = await stats_until(client, lambda s: s["outcomes"]["cancelled"] == 2, what="server noticed")
                assert stats["queue_depth"] == 0
                assert (await running).status_code == 200
                after = await client.post("/v1/embeddings", json={"input": "after"})
                assert after.status_code == 200
                stats = await stats_until(client, lambda s: s["inflight_batches"] == 0, what="idle")
                assert stats["real_tokens"] == 3 + 3  # "running" and "after" ran; 10 + 12 tokens did not
                assert stats["outcomes"] == {"completed": 2, "failed": 0, "cancelled": 2, "timed_out": 0}
                assert stats["requests_total"] == 4
        asyncio.run(scenario())
