"""One engine per served model: its backend, its model thread, its scheduler loop and its stats.
This module holds what every task shares (lifecycle, supervision, drain); the task-specific parts
are batchd/embed (batches of inputs) and batchd/generate (continuous batching of sequences)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from . import runtime
from .backends import Backend, make_backend
from .config import Config, ModelConfig, ServerConfig
from .errors import BatchdError, ClientDisconnected, DeadlineExceeded, EngineDead, NotReady, ShuttingDown
from .metrics import ModelMetrics, PrometheusMetrics, state_reading
from .scheduler import StepLoop, Task
from .worker import ModelWorker

log = logging.getLogger("batchd.engine")


class Engine:
    """Lifecycle: loading -> ready -> draining -> stopped, or -> dead when the model thread or the
    scheduler fails. Subclasses build `self.task` (what the scheduler loop plans) and `self.stats`."""

    kind = "embed"

    def __init__(self, server: ServerConfig, model: ModelConfig, backend: Backend | None = None,
                 metrics: ModelMetrics | None = None) -> None:
        self.server_config = server
        self.model_config = model
        self.backend = backend or make_backend(model)
        self.name = model.name
        self.metrics = metrics or PrometheusMetrics().for_model(model.name)
        self.metrics.track("batchd_engine_state", state_reading(lambda: self.state))
        self.worker = ModelWorker(self.backend)
        self.state = "loading"
        self.failure: str | None = None
        self.active_requests = 0
        self._loop_task: asyncio.Task | None = None
        self.stopping = StopSignal()  # fired when accepted requests must stop waiting (drain ran out)

    def build_loop(self, task: Task) -> StepLoop:
        self.loop = StepLoop(task, self.worker, self._die)
        return self.loop

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm the model on its thread, then start scheduling. /health is 503 until then."""
        try:
            await self.worker.load()
            await self.warm_up()
        except Exception as exc:
            log.exception("model %s failed to load", self.name)
            self._die(exc)
            return
        if self.state == "loading":
            runtime.settle(self.server_config.gil_switch_interval_ms)
            self._loop_task = asyncio.create_task(self.loop.run(), name=f"batchd-scheduler-{self.name}")
            self._loop_task.add_done_callback(self._loop_ended)
            self.state = "ready"
            log.info("model %s ready", self.name)

    async def warm_up(self) -> None:
        """Start-up measurements on the model thread (cost probes); nothing by default."""

    def _loop_ended(self, task: asyncio.Task) -> None:
        """Supervision: a scheduler loop only ends when cancelled at close; anything else is a bug
        that would hang every request until its deadline, so the engine dies loudly instead."""
        if task.cancelled():
            return
        exc = task.exception() or RuntimeError("the scheduler loop returned")
        log.error("scheduler of %s died", self.name, exc_info=exc)
        self._die(exc)

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, let accepted requests finish. True when all finished within timeout."""
        if self.state == "ready":
            self.state = "draining"
        give_up = time.monotonic() + timeout
        while self.active_requests and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        if not self.active_requests:
            return True
        # Out of time: answer the rest 503 now, rather than let the HTTP server cut them off (a bare 500).
        self.stopping.fire()
        give_up = time.monotonic() + 1.0
        while self.active_requests and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        return False

    async def close(self) -> None:
        if self.state != "dead":
            self.state = "stopped"
        self.fail_waiting(ShuttingDown("the server is shutting down"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self.worker.shutdown()

    def _die(self, exc: BaseException) -> None:
        if self.state == "dead":
            return
        log.error("engine %s dead: %r", self.name, exc)
        self.state, self.failure = "dead", type(exc).__name__
        self.fail_waiting(EngineDead("the model worker failed; the server cannot serve"))
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()

    def fail_waiting(self, exc: BatchdError) -> None:
        """Fail every request that waits for this engine (death, shutdown)."""
        raise NotImplementedError

    def check_accepting(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise NotReady("the model is still loading")
        if self.state == "dead":
            raise EngineDead("the model worker failed; the server cannot serve")
        raise ShuttingDown("the server is shutting down")

    def snapshot(self) -> dict:
        """/stats for this model."""
        return {"model": self.name, "task": self.kind, "state": self.state, **self.stats.snapshot()}


class StopSignal:
    """Fires once, calling every callback added before (and at once, any added after). Every
    waiting request adds one and removes it when it ends: a dict removes in O(1), where a shared
    Future's remove_done_callback scans all the others (hundreds in flight, on every request)."""

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: dict[Callable[[], None], None] = {}

    def add(self, callback: Callable[[], None]) -> None:
        if self.fired:
            callback()
        else:
            self._callbacks[callback] = None

    def discard(self, callback: Callable[[], None]) -> None:
        self._callbacks.pop(callback, None)

    def fire(self) -> None:
        self.fired = True
        callbacks, self._callbacks = self._callbacks, {}
        for callback in callbacks:
            callback()


def ending_of(exc: BaseException) -> tuple[str, str | None]:
    """(outcome, failure reason) of an accepted request that ended with `exc`: every task counts its
    requests the same way (accepted = completed + failed + cancelled + timed_out)."""
    if isinstance(exc, DeadlineExceeded):
        return "timed_out", None
    if isinstance(exc, (ClientDisconnected, asyncio.CancelledError, GeneratorExit)):
        return "cancelled", None
    return "failed", exc.code if isinstance(exc, BatchdError) else None


def make_engine(config: Config, model: ModelConfig | None = None, metrics: ModelMetrics | None = None,
                backend: Backend | None = None) -> Engine:
    """The engine for one of the config's models (the first when `model` is None)."""
    model = model or config.model
    if model.kind == "generate":
        from .generate.engine import GenerateEngine
        return GenerateEngine(config.server, model, backend, metrics)
    from .embed.engine import EmbedEngine
    return EmbedEngine(config.server, model, backend, metrics)
