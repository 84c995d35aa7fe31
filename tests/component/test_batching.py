"""Real queue + scheduler + model thread, with the deterministic fake backend."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from batchd.backends.fake import FakeBackend
from tests.helpers import fake_config, running_engine


def _ids(engine, text):
    return engine.backend.tokenize([text], False)


def _deadline():
    return time.monotonic() + 30


async def test_batches_fill_up_to_max_batch_size_while_the_worker_is_busy():
    cfg = fake_config(model={"fake_batch_ms": 30}, batching={"max_batch_size": 8})
    async with running_engine(cfg) as engine:
        texts = [f"word{i}" for i in range(41)]
        await asyncio.gather(*(engine.embed(_ids(engine, t), _deadline()) for t in texts))
        sizes = engine.backend.batch_sizes
        assert sum(sizes) == 41
        assert max(sizes) == 8 and sizes.count(8) >= 4  # full batches formed behind the running one
        assert engine.stats.snapshot()["batches_total"] == len(sizes) < 41


async def test_padded_token_budget_caps_the_batch():
    # 30-word texts (32 tokens with BOS/EOS) land in bucket 32: a budget of 64 padded tokens fits two
    cfg = fake_config(model={"fake_batch_ms": 20, "max_length": 32},
                      batching={"max_batch_tokens": 64, "max_batch_size": 64, "buckets": [16, 32]})
    async with running_engine(cfg) as engine:
        texts = [" ".join(f"w{i}_{j}" for j in range(30)) for i in range(10)]
        await asyncio.gather(*(engine.embed(_ids(engine, t), _deadline()) for t in texts))
        assert max(engine.backend.batch_sizes) == 2
        assert sum(engine.backend.batch_sizes) == 10


async def test_classic_wait_holds_an_idle_batch_open_for_company_and_adaptive_does_not():
    async def batch_sizes(adaptive: bool) -> list[int]:
        cfg = fake_config(batching={"max_wait_ms": 300, "adaptive_wait": adaptive})
        async with running_engine(cfg) as engine:
            first = asyncio.ensure_future(engine.embed(_ids(engine, "first"), _deadline()))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(engine.embed(_ids(engine, "second"), _deadline()))
            await asyncio.gather(first, second)
            return engine.backend.batch_sizes

    assert await batch_sizes(adaptive=False) == [2]  # waited max_wait for the second arrival
    assert await batch_sizes(adaptive=True) == [1, 1]  # idle worker, no arrival history: go at once


async def test_each_caller_gets_its_own_vector():
    cfg = fake_config(model={"fake_batch_ms": 5}, batching={"max_batch_size": 16})
    reference = FakeBackend(cfg.model)
    reference.load()  # the reference runs on this thread, outside the engine
    async with running_engine(cfg) as engine:
        texts = [" ".join(f"t{i}" for _ in range(1 + i % 7)) + f" x{i}" for i in range(120)]
        results = await asyncio.gather(*(engine.embed(_ids(engine, t), _deadline()) for t in texts))
        for text, [result] in zip(texts, results):
            expected, _ = reference.embed(reference.tokenize([text], False))
            np.testing.assert_allclose(result.vector, expected[0], rtol=1e-6)
        assert engine.stats.snapshot()["mean_batch_size"] > 1


async def test_a_list_request_keeps_input_order_across_batches():
    cfg = fake_config(model={"fake_batch_ms": 5}, batching={"max_batch_size": 3})
    async with running_engine(cfg) as engine:
        texts = [" ".join(["w"] * n) + f" {n}" for n in (40, 1, 20, 3, 60, 2, 9)]
        results = await engine.embed(engine.backend.tokenize(texts, False), _deadline())
        reference = FakeBackend(cfg.model)
        reference.load()
        expected, _ = reference.embed(reference.tokenize(texts, False))
        np.testing.assert_allclose(np.stack([r.vector for r in results]), expected, rtol=1e-6)


@pytest.mark.parametrize("inflight", [1, 2])
async def test_a_cancelled_caller_is_never_run(inflight):
    # batch size 1: the cancelled input is either still queued or already formed into the prepared batch
    cfg = fake_config(model={"fake_batch_ms": 80},
                      batching={"max_batch_size": 1, "max_inflight_batches": inflight})
    async with running_engine(cfg) as engine:
        busy = asyncio.ensure_future(engine.embed(_ids(engine, "busy"), _deadline()))
        await asyncio.sleep(0.02)
        doomed = asyncio.ensure_future(engine.embed(_ids(engine, "doomed"), _deadline()))
        later = asyncio.ensure_future(engine.embed(_ids(engine, "later"), _deadline()))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.gather(busy, later)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        ran = {tuple(r) for r in engine.backend.seen}
        assert tuple(_ids(engine, "busy")[0]) in ran and tuple(_ids(engine, "later")[0]) in ran
        assert tuple(_ids(engine, "doomed")[0]) not in ran
        snap = engine.stats.snapshot()
        assert snap["outcomes"] == {"completed": 2, "failed": 0, "cancelled": 1, "timed_out": 0}
        assert snap["queue_depth"] == 0


@pytest.mark.parametrize("merge, expected", [(True, [8]), (False, [4, 4])])
async def test_neighbouring_lanes_share_a_batch_only_when_merging_is_on(merge, expected):
    # 20 ms per batch and 10 us per token: a batch's fixed cost is worth far more than the padding
    # that 60-token inputs add when they ride with 64-token ones (lanes 60 and 64)
    cfg = fake_config(model={"fake_batch_ms": 20, "fake_token_us": 10}, batching={"merge_lanes": merge})
    async with running_engine(cfg) as engine:
        busy = asyncio.ensure_future(engine.embed(_ids(engine, "busy"), _deadline()))
        await asyncio.sleep(0.005)
        texts = [" ".join(f"w{i}_{j}" for j in range(58 + 4 * (i % 2))) for i in range(8)]  # 60 or 64 tokens
        await asyncio.gather(busy, *(engine.embed(_ids(engine, t), _deadline()) for t in texts))
        assert engine.backend.batch_sizes == [1, *expected]
