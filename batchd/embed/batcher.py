"""The embedding task of the scheduler loop: asks the pure lane policy (batchd/policy.py) for the next
batch, runs it on the model thread as one step in which every input finishes, and completes every
input's future exactly once when it comes back."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import DeadlineExceeded, EngineDead, FatalBackendError, InferenceFailed, ShuttingDown
from ..estimators import ArrivalGap, BatchCost
from ..policy import Dispatch, Hold, PolicyParams, padding_ratio, plan_batch
from ..queue import RequestQueue
from ..scheduler import complete
from ..stats import Stats
from ..types import BatchOutcome, ItemResult, Pending
from ..worker import ModelWorker

log = logging.getLogger("batchd.embed")
OOM_BACKOFF_S = 30.0  # how long the token budget stays halved after an out-of-memory error


class EmbedStep:
    """One batch of inputs; `run` executes on the model thread."""
    __slots__ = ("items", "tokens", "saturated")

    def __init__(self, items: list[Pending], saturated: bool) -> None:
        self.items = items
        self.tokens = sum(item.n_tokens for item in items)
        # Only batches with work behind them show the drain rate that admission plans with: a lone
        # input on an idle server is slow per token and would make the server look slower than it is.
        self.saturated = saturated

    def run(self, worker: ModelWorker) -> BatchOutcome:
        """Embed the inputs still wanted. On an exception, bisect the batch so that only the
        input(s) that raise fail; an out-of-memory error bisects too and is reported."""
        items = self.items
        outcome = BatchOutcome(outputs=[None] * len(items), started=time.monotonic(), fatal=worker.dead)
        wanted = [i for i, item in enumerate(items) if not item.cancelled]  # dropped while it waited
        outcome.batch_size = len(wanted)
        if wanted:
            _run_part(worker, items, wanted, outcome)
        worker.dead = outcome.fatal
        return outcome


def _run_part(worker: ModelWorker, items: Sequence[Pending], part: list[int], outcome: BatchOutcome) -> None:
    if outcome.fatal is not None:
        for i in part:
            outcome.outputs[i] = outcome.fatal
        return
    started = time.perf_counter()
    try:
        vectors, padded = worker.backend.embed([items[i].token_ids for i in part])
        error = None
    except Exception as exc:  # one input's fault until bisection proves otherwise
        error = exc
    outcome.model_s += time.perf_counter() - started
    outcome.calls += 1
    if isinstance(error, FatalBackendError):
        outcome.fatal = error
        for i in part:
            outcome.outputs[i] = error
        return
    if error is not None:
        outcome.oom = outcome.oom or worker.backend.is_oom(error)
        if len(part) == 1:
            outcome.outputs[part[0]] = error
            return
        half = len(part) // 2
        _run_part(worker, items, part[:half], outcome)
        _run_part(worker, items, part[half:], outcome)
        return
    outcome.padded_tokens += padded
    for row, i in enumerate(part):
        outcome.outputs[i] = vectors[row]
        outcome.real_tokens += items[i].n_tokens


class EmbedBatcher:
    """Queue -> batches -> futures. Event-loop thread only."""

    def __init__(self, queue: RequestQueue, stats: Stats, params: PolicyParams,
                 on_fatal: Callable[[BaseException], None], merge_lanes: bool = True) -> None:
        self.queue = queue
        self.stats = stats
        self.base_params = self.params = params
        self.on_fatal = on_fatal
        self.merge_lanes = merge_lanes
        self.inflight = 0
        self.inflight_tokens = 0  # real tokens of the batches handed to the model thread, not yet back
        self.arrivals = ArrivalGap()
        self.cost = BatchCost()
        self.wake: Callable[[], None] = lambda: None  # set by the scheduler loop that runs this task
        self._budget_restore_at = 0.0

    def set_token_budget(self, max_batch_tokens: int) -> None:
        self.base_params = self.params = dataclasses.replace(self.base_params, max_batch_tokens=max_batch_tokens)

    def notify(self) -> None:
        """New work arrived (or left): plan again, unless both batch slots are taken, when nothing
        can be dispatched before a batch finishes (and that wakes the scheduler itself). Under load
        this saves a scheduler step per arrival."""
        if self.inflight < self.params.max_inflight:
            self.wake()

    # ---- the scheduler loop's Task ----------------------------------------------------------------
    def plan(self, now: float) -> EmbedStep | Hold | None:
        if self._budget_restore_at and now >= self._budget_restore_at:
            self.params, self._budget_restore_at = self.base_params, 0.0
        while True:
            decision = plan_batch(self.queue.views(), now, self.params, self.inflight,
                                  self.arrivals.expected(now), self.cost.overhead_s,
                                  self.cost.merge_tokens if self.merge_lanes else 0.0)
            if not isinstance(decision, Dispatch):
                return decision
            step = self._take(decision, now)
            if step is not None:
                return step

    def _take(self, decision: Dispatch, now: float) -> EmbedStep | None:
        batch = []
        for item in self.queue.take(decision.takes):
            if now > item.deadline:  # expired while queued: never reaches the model
                complete(item.future, exc=DeadlineExceeded("request deadline passed while queued"))
            else:
                batch.append(item)
        if not batch:
            return None
        step = EmbedStep(batch, saturated=self.queue.depth > 0)
        self.inflight += 1
        self.inflight_tokens += step.tokens
        return step

    def abandon(self, step: EmbedStep) -> None:
        self._release(step)
        for item in step.items:
            complete(item.future, exc=ShuttingDown("the server shut down before this input ran"))

    def _release(self, step: EmbedStep) -> None:
        self.inflight -= 1
        self.inflight_tokens -= step.tokens

    def finish(self, step: EmbedStep, outcome: BatchOutcome | BaseException) -> None:
        self._release(step)
        batch = step.items
        if isinstance(outcome, BaseException):  # the executor itself failed: treat as a lost device
            outcome = BatchOutcome(outputs=[outcome] * len(batch), fatal=outcome)
        padding = padding_ratio(outcome.real_tokens, outcome.padded_tokens)
        waits = []
        for item, output in zip(batch, outcome.outputs):
            if isinstance(output, np.ndarray):
                wait = max(0.0, outcome.started - item.arrival)
                waits.append(wait)
                complete(item.future, result=ItemResult(output, wait, outcome.model_s, outcome.batch_size, padding))
            elif outcome.fatal is not None:
                complete(item.future, exc=EngineDead("the model worker failed; the server cannot serve"))
            elif output is not None:
                log.error("input failed in the model: %r", output)
                complete(item.future, exc=InferenceFailed("the model failed on this input"))
            else:  # dropped before the model ran it: its caller is gone already
                item.future.cancel()
        if outcome.calls:
            self.stats.batch_finished(outcome.batch_size, outcome.calls, outcome.real_tokens,
                                      outcome.padded_tokens, outcome.model_s, waits)
        if outcome.calls == 1 and outcome.padded_tokens:
            if step.saturated:
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
