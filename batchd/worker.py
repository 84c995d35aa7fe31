"""The single model thread: the only thread that touches the model.

A batch crosses over as the argument of `run_in_executor` and comes back as its return value, so
every result lands on the event-loop thread, where futures are completed.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

from .backends import Backend
from .errors import FatalBackendError
from .types import BatchOutcome, Pending

T = TypeVar("T")


class ModelWorker:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-model")
        self.dead: BaseException | None = None

    async def load(self) -> None:
        await self.call(self.backend.load)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread (start-up work such as loading and calibration)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, items: Sequence[Pending]) -> asyncio.Future[BatchOutcome]:
        return asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, items)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- model thread ------------------------------------------------------------------------
    def run_batch(self, items: Sequence[Pending]) -> BatchOutcome:
        """Embed the inputs still wanted. On an exception, bisect the batch so that only the
        input(s) that raise fail; an out-of-memory error bisects too and is reported."""
        outcome = BatchOutcome(outputs=[None] * len(items), started=time.monotonic(), fatal=self.dead)
        wanted = [i for i, item in enumerate(items) if not item.cancelled]  # dropped while it waited
        outcome.batch_size = len(wanted)
        if wanted:
            self._run_part(items, wanted, outcome)
        self.dead = outcome.fatal  # once the device is lost, nothing more runs on it
        return outcome

    def _run_part(self, items: Sequence[Pending], part: list[int], outcome: BatchOutcome) -> None:
        if outcome.fatal is not None:
            for i in part:
                outcome.outputs[i] = outcome.fatal
            return
        started = time.perf_counter()
        try:
            vectors, padded = self.backend.embed([items[i].token_ids for i in part])
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
            outcome.oom = outcome.oom or self.backend.is_oom(error)
            if len(part) == 1:
                outcome.outputs[part[0]] = error
                return
            half = len(part) // 2
            self._run_part(items, part[:half], outcome)
            self._run_part(items, part[half:], outcome)
            return
        outcome.padded_tokens += padded
        for row, i in enumerate(part):
            outcome.outputs[i] = vectors[row]
            outcome.real_tokens += items[i].n_tokens
