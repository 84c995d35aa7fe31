"""The scheduler coroutine: asks the pure policy what to run, hands batches to the model thread,
and completes every future exactly once when a batch comes back."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

import numpy as np

from .errors import DeadlineExceeded, EngineDead, InferenceFailed, ShuttingDown
from .estimators import ArrivalGap, BatchCost
from .policy import Dispatch, Hold, PolicyParams, padding_ratio, plan_batch
from .queue import RequestQueue
from .stats import Stats
from .types import BatchOutcome, ItemResult, Pending
from .worker import ModelWorker

log = logging.getLogger("batchd.scheduler")
OOM_BACKOFF_S = 30.0  # how long the token budget stays halved after an out-of-memory error


class Scheduler:
    def __init__(self, queue: RequestQueue, worker: ModelWorker, stats: Stats, params: PolicyParams,
                 on_fatal: Callable[[BaseException], None], merge_lanes: bool = True) -> None:
        self.queue = queue
        self.worker = worker
        self.stats = stats
        self.base_params = self.params = params
        self.on_fatal = on_fatal
        self.merge_lanes = merge_lanes
        self.inflight = 0
        self.inflight_tokens = 0  # real tokens of the batches handed to the model thread, not yet back
        self.arrivals = ArrivalGap()
        self.cost = BatchCost()
        self._wakeup = asyncio.Event()
        self._budget_restore_at = 0.0

    def set_token_budget(self, max_batch_tokens: int) -> None:
        self.base_params = self.params = dataclasses.replace(self.base_params, max_batch_tokens=max_batch_tokens)

    def notify(self) -> None:
        """New work arrived (or left): plan again, unless both batch slots are taken, when nothing
        can be dispatched before a batch finishes (and that wakes the scheduler itself). Under load
        this saves a scheduler step per arrival."""
        if self.inflight < self.params.max_inflight:
            self._wakeup.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            if self._budget_restore_at and now >= self._budget_restore_at:
                self.params, self._budget_restore_at = self.base_params, 0.0
            decision = plan_batch(self.queue.views(), now, self.params, self.inflight,
                                  self.arrivals.expected(now), self.cost.overhead_s,
                                  self.cost.merge_tokens if self.merge_lanes else 0.0)
            if isinstance(decision, Dispatch):
                self._dispatch(decision, now)
                continue
            timer = loop.call_later(decision.until - now, self._wakeup.set) if isinstance(decision, Hold) else None
            await self._wakeup.wait()
            if timer is not None:
                timer.cancel()

    def _dispatch(self, decision: Dispatch, now: float) -> None:
        batch = []
        for item in self.queue.take(decision.takes):
            if now > item.deadline:  # expired while queued: never reaches the model
                _complete(item.future, exc=DeadlineExceeded("request deadline passed while queued"))
            else:
                batch.append(item)
        if not batch:
            return
        tokens = sum(item.n_tokens for item in batch)
        self.inflight += 1
        self.inflight_tokens += tokens
        # Only batches with work behind them show the drain rate that admission plans with: a lone
        # input on an idle server is slow per token and would make the server look slower than it is.
        saturated = self.queue.depth > 0
        future = self.worker.submit(batch)
        future.add_done_callback(lambda f: self._batch_done(batch, tokens, f, saturated))

    def _batch_done(self, batch: list[Pending], tokens: int, future: asyncio.Future[BatchOutcome],
                    saturated: bool) -> None:
        self.inflight -= 1
        self.inflight_tokens -= tokens
        self._wakeup.set()
        if future.cancelled():  # the engine closed before the model thread took this batch
            for item in batch:
                _complete(item.future, exc=ShuttingDown("the server shut down before this input ran"))
            return
        try:
            outcome = future.result()
        except BaseException as exc:  # the executor itself failed: treat as a lost device
            outcome = BatchOutcome(outputs=[exc] * len(batch), fatal=exc)
        padding = padding_ratio(outcome.real_tokens, outcome.padded_tokens)
        waits = []
        for item, output in zip(batch, outcome.outputs):
            if isinstance(output, np.ndarray):
                wait = max(0.0, outcome.started - item.arrival)
                waits.append(wait)
                _complete(item.future, result=ItemResult(output, wait, outcome.model_s, outcome.batch_size, padding))
            elif outcome.fatal is not None:
                _complete(item.future, exc=EngineDead("the model worker failed; the server cannot serve"))
            elif output is not None:
                log.error("input failed in the model: %r", output)
                _complete(item.future, exc=InferenceFailed("the model failed on this input"))
            else:  # dropped before the model ran it: its caller is gone already
                item.future.cancel()
        if outcome.calls:
            self.stats.batch_finished(outcome.batch_size, outcome.calls, outcome.real_tokens,
                                      outcome.padded_tokens, outcome.model_s, waits)
        if outcome.calls == 1 and outcome.padded_tokens:
            if saturated:
                self.cost.observe(outcome.padded_tokens, outcome.real_tokens, outcome.model_s)
            else:
                self.cost.seed(outcome.padded_tokens, outcome.model_s)
        if outcome.oom:
            budget = max(1, self.params.max_batch_tokens // 2)
            log.warning("out of memory: token budget lowered to %d for %.0f s", budget, OOM_BACKOFF_S)
            self.params = dataclasses.replace(self.params, max_batch_tokens=budget)
            self._budget_restore_at = time.monotonic() + OOM_BACKOFF_S
        if outcome.fatal is not None:
            self.on_fatal(outcome.fatal)


def _complete(future: asyncio.Future, result: object = None, exc: BaseException | None = None) -> None:
    """Complete a future at most once: a caller may have given up on it already."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
