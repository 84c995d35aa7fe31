"""The embedding engine: admits a request's inputs whole or not at all, queues one Pending per input
in its length lane, and answers when every input is back, the deadline passes or the client goes."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Sequence

import numpy as np

from .. import calibrate
from ..backends import Backend
from ..config import ModelConfig, ServerConfig
from ..engine import Engine, StopSignal, ending_of
from ..errors import BatchdError, ClientDisconnected, DeadlineExceeded, Overloaded, ShuttingDown
from ..metrics import ModelMetrics
from ..policy import PolicyParams, bucket_of
from ..queue import RequestQueue
from ..stats import Stats
from ..types import ItemResult, Pending
from .batcher import EmbedBatcher

log = logging.getLogger("batchd.embed")


class EmbedEngine(Engine):
    kind = "embed"

    def __init__(self, server: ServerConfig, model: ModelConfig, backend: Backend | None = None,
                 metrics: ModelMetrics | None = None) -> None:
        super().__init__(server, model, backend, metrics)
        b = self.batching = model.batching
        self.queue = RequestQueue(list(b.buckets))
        self.stats = Stats(lambda: self.queue.depth, lambda: self.scheduler.inflight, self.metrics)
        params = PolicyParams(b.max_batch_size, b.max_batch_tokens, b.max_wait_ms / 1e3,
                              b.max_inflight_batches, b.adaptive_wait)
        self.scheduler = EmbedBatcher(self.queue, self.stats, params, self._die, b.merge_lanes)
        self.scheduler.wake = self.build_loop(self.scheduler).wake

    async def warm_up(self) -> None:
        await self._probe_cost()
        if self.batching.max_batch_tokens == 0:
            await self._calibrate_budget()

    async def _probe_cost(self) -> None:
        """Time a few small batches so the cost model knows a batch's fixed cost from the first
        request on (the adaptive wait and lane merging depend on it)."""
        await self._time_batches(self.batching.buckets[0] * 4, min(8, self.batching.max_batch_size))

    async def _calibrate_budget(self) -> None:
        """max_batch_tokens = 0: measure the model on the longest bucket and size the budget to it."""
        b = self.batching
        points = await self._time_batches(b.buckets[-1], b.max_batch_size)
        budget = max(calibrate.choose_budget(points), b.buckets[-1])
        self.scheduler.set_token_budget(budget)
        log.info("token budget calibrated: %d padded tokens per batch (measured %s)", budget,
                 ", ".join(f"{t} tok: {s * 1e3:.0f} ms" for t, s in points))

    async def _time_batches(self, length: int, max_size: int) -> list[tuple[int, float]]:
        """Doubling batches of `length` tokens timed on the model thread; each timing seeds the cost model."""
        points = await self.worker.call(calibrate.measure, self.backend.embed, length, max_size,
                                        self.backend.calibration_token_id)
        for tokens, seconds in points:
            self.scheduler.cost.seed(tokens, seconds)
        return points

    def fail_waiting(self, exc: BatchdError) -> None:
        for item in self.queue.drain():
            if not item.future.done():
                item.future.set_exception(exc)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "max_batch_tokens": self.scheduler.params.max_batch_tokens,
                "cost_model": self.scheduler.cost.snapshot()}

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, token_ids: Sequence[np.ndarray], deadline: float) -> list[Pending]:
        """Admit all inputs of one request or none, fast: refusal beats a hidden queue."""
        self.check_accepting()
        max_queue = self.batching.max_queue
        if self.queue.depth + len(token_ids) > max_queue:
            raise Overloaded(f"queue full: {self.queue.depth} inputs waiting (max_queue={max_queue})",
                             headers={"Retry-After": self._retry_after()})
        now = time.monotonic()
        rate = self.scheduler.cost.tokens_per_s
        if rate > 0:
            ahead = self._tokens_ahead()
            mine = sum(len(t) for t in token_ids)
            # A batch answers as a whole: under load the one carrying these inputs also carries later
            # arrivals, up to a full batch (bounded by the work ahead, so an idle server is not pessimistic).
            p = self.scheduler.params
            longest = bucket_of(max(len(t) for t in token_ids), self.batching.buckets) or p.max_batch_tokens
            rest_of_batch = max(0, min(ahead, p.max_batch_tokens - longest, (p.max_batch_size - 1) * longest))
            expected_s = (ahead + mine + rest_of_batch) / rate
            if now + expected_s > deadline:
                raise Overloaded(
                    f"the queue ahead needs about {expected_s:.1f} s, past this request's deadline",
                    code="deadline_unmeetable", headers={"Retry-After": self._retry_after()})
        loop = asyncio.get_running_loop()
        buckets = self.batching.buckets
        items = [Pending(ids, bucket_of(len(ids), buckets), now, deadline, loop.create_future())  # type: ignore[arg-type]
                 for ids in token_ids]
        for item in items:
            self.queue.push(item)
            self.scheduler.arrivals.observe(now)
        self.scheduler.notify()
        return items

    def _tokens_ahead(self) -> int:
        """Real tokens a new request waits behind: queued, and in batches already formed."""
        return self.queue.tokens + self.scheduler.inflight_tokens

    def _retry_after(self) -> str:
        rate = self.scheduler.cost.tokens_per_s
        return str(max(1, math.ceil(self._tokens_ahead() / rate))) if rate > 0 else "1"

    async def embed(self, token_ids: Sequence[np.ndarray], deadline: float,
                    client_gone: asyncio.Future | None = None, tokenize_s: float = 0.0) -> list[ItemResult]:
        """Queue the inputs of one request and wait for all of them, the deadline or the client
        leaving, whichever comes first. Every accepted request is counted once in one outcome."""
        started = time.monotonic()
        try:
            items = self.submit(token_ids, deadline)
        except BatchdError as exc:  # refused at admission: not accepted, counted by reason
            self.stats.request_rejected(exc.code or type(exc).__name__)
            raise
        self.stats.request_accepted(len(items), tokenize_s, sum(item.n_tokens for item in items))
        self.active_requests += 1
        waiter = _RequestWaiter(items, deadline, client_gone, self.stopping)
        outcome, reason = "failed", None
        try:
            await waiter.future
            outcome = "completed"
            return [item.future.result() for item in items]
        except BaseException as exc:
            outcome, reason = ending_of(exc)
            raise
        finally:
            waiter.close()
            for item in items:
                if not item.future.done():
                    self.queue.cancel(item)  # the model will skip it, even from a formed batch
                    item.future.cancel()
            self.active_requests -= 1
            self.stats.request_finished(outcome, time.monotonic() - started, reason)
            self.scheduler.notify()


class _RequestWaiter:
    """One future per request, done when all its inputs are, at the first failure, at the deadline,
    when the client goes or when the drain runs out of time. Cheaper per request than gather +
    asyncio.wait with a timeout, which matters at thousands of requests per second."""

    def __init__(self, items: Sequence[Pending], deadline: float, client_gone: asyncio.Future | None,
                 stopping: StopSignal) -> None:
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = loop.create_future()
        self._left = len(items)
        self._items = items
        for item in items:
            item.future.add_done_callback(self._input_done)
        # loop.time() is time.monotonic(), the clock deadlines are set in
        self._timer = loop.call_at(deadline, self._fail, DeadlineExceeded,
                                   "request deadline passed before its inputs were embedded")
        self._client_gone = client_gone
        if client_gone is not None:
            client_gone.add_done_callback(self._client_left)
        self._stopping = stopping
        stopping.add(self._stopped)

    def _input_done(self, future: asyncio.Future) -> None:
        if future.cancelled():
            return  # only this request cancels its own inputs, after it has finished waiting
        exc = future.exception()  # also marks it retrieved: no "never retrieved" log noise
        if exc is not None:
            if not self.future.done():
                self.future.set_exception(exc)
            return
        self._left -= 1
        if self._left == 0 and not self.future.done():
            self.future.set_result(None)

    def _client_left(self, _: asyncio.Future) -> None:
        self._fail(ClientDisconnected, "client disconnected")

    def _stopped(self) -> None:
        self._fail(ShuttingDown, "the server shut down before this request finished")

    def _fail(self, error: type[BatchdError], message: str) -> None:
        """The exception is only built when the request ends this way, not on every request."""
        if not self.future.done():
            self.future.set_exception(error(message))

    def close(self) -> None:
        self._timer.cancel()
        if self.future.done() and not self.future.cancelled():
            self.future.exception()  # retrieved, whether or not the awaiting task saw it
        if self._client_gone is not None:
            self._client_gone.remove_done_callback(self._client_left)
        self._stopping.discard(self._stopped)
        for item in self._items:
            item.future.remove_done_callback(self._input_done)
