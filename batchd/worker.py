"""The single model thread: the only thread that touches the model.

A step crosses over as the argument of `run_in_executor` and its outcome comes back as the return
value, so every result lands on the event-loop thread, where futures are completed. What a step does
on the thread is the step's own business (`step.run(worker)`): an embedding batch, a decode step.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from .backends import Backend

T = TypeVar("T")
# transformers' from_pretrained builds modules under process-wide patches (meta device, skipped init):
# two models loading at once on two model threads leave one with meta tensors. Loads take turns.
_LOAD_LOCK = threading.Lock()


class ModelWorker:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchd-model")
        self.dead: BaseException | None = None  # once the device is lost, nothing more runs on it

    async def load(self) -> None:
        await self.call(self._load)

    def _load(self) -> None:
        with _LOAD_LOCK:
            self.backend.load()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread (start-up work such as loading and calibration)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, step: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._executor, step.run, self)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
