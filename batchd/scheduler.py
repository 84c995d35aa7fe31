"""The scheduler coroutine, the same for every task: ask the task's pure planner for the next step,
hand it to the model thread, give the outcome back to the task when it returns.

An embedding batch is a step in which every sequence finishes; a generation step prefills joining
sequences and decodes one token for every running one. The task decides what a step is and what its
outcome means; this loop only moves steps between the event loop and the model thread.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

from .policy import Hold
from .worker import ModelWorker

log = logging.getLogger("batchd.scheduler")


class Step(Protocol):
    def run(self, worker: ModelWorker) -> Any:
        """Runs on the model thread; its return value is the step's outcome."""


class Task(Protocol):
    def plan(self, now: float) -> Step | Hold | None:
        """The next step to run now, a Hold, or None (nothing until work arrives or a step returns)."""

    def finish(self, step: Step, outcome: Any) -> None:
        """The model thread returned `outcome` (an exception when the executor itself failed)."""

    def abandon(self, step: Step) -> None:
        """The step never ran: the engine closed before the model thread took it."""


class StepLoop:
    def __init__(self, task: Task, worker: ModelWorker, on_fatal: Callable[[BaseException], None]) -> None:
        self.task = task
        self.worker = worker
        self.on_fatal = on_fatal
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            decision = self.task.plan(now)
            if decision is not None and not isinstance(decision, Hold):
                future = self.worker.submit(decision)
                future.add_done_callback(lambda f, step=decision: self._step_done(step, f))
                continue
            timer = loop.call_later(decision.until - now, self._wakeup.set) if decision is not None else None
            await self._wakeup.wait()
            if timer is not None:
                timer.cancel()

    def _step_done(self, step: Step, future: asyncio.Future) -> None:
        self._wakeup.set()
        try:
            if future.cancelled():
                self.task.abandon(step)
                return
            exc = future.exception()
            self.task.finish(step, exc if exc is not None else future.result())
        except Exception as exc:  # a bug in the task's bookkeeping: that engine cannot be trusted any more
            log.exception("scheduler failed while finishing a step")
            self.on_fatal(exc)


def complete(future: asyncio.Future, result: object = None, exc: BaseException | None = None) -> None:
    """Complete a future at most once: a caller may have given up on it already."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
