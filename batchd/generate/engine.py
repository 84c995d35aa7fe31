"""The generation engine: sequences wait in arrival order, join the running batch at the next step,
get one token per step, and leave the step they finish (or the step after their client left).

Event-loop side: admission, the step planner's inputs and outputs, detokenizing, stop strings,
streaming to each request's collector. Model-thread side: backends/generate.py (one `step` a step).
Tokens come back to the loop once per step for all sequences: one thread hop per step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from ..backends.generate import GenerateBackend, Sampling, StepOutput, ThreadStep
from ..config import ModelConfig, ServerConfig
from ..engine import Engine, ending_of
from ..errors import (BatchdError, ClientDisconnected, DeadlineExceeded, FatalBackendError,
                      InferenceFailed, InvalidRequest, Overloaded, ShuttingDown)
from ..metrics import ModelMetrics
from ..stats import GenerationStats
from ..worker import ModelWorker
from .planner import SeqView, StepParams, plan_step
from .text import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("batchd.generate")


@dataclass(slots=True)
class GenerationParams:
    max_tokens: int | None = None  # None: up to the model's max_length
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: Sequence[str] = ()
    sampling: Sampling = None  # type: ignore[assignment]


class Output:
    """One sequence's collector: text deltas pile up here between reads (a slow reader gets them
    merged), and it ends with a finish reason or an exception."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._event = asyncio.Event()
        self.finish_reason: str | None = None
        self.error: BatchdError | None = None

    def push(self, text: str) -> None:
        if text:
            self._text.append(text)
            self._event.set()

    def end(self, reason: str | None = None, error: BatchdError | None = None) -> None:
        if self.finish_reason is None and self.error is None:
            self.finish_reason, self.error = reason, error
            self._event.set()

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    async def next(self) -> tuple[str, str | None]:
        """(text so far unread, finish reason once ended); raises the sequence's error."""
        while not self._text and not self.ended:
            self._event.clear()
            await self._event.wait()
        text, self._text = "".join(self._text), []
        if self.error is not None and not text:
            raise self.error
        return text, self.finish_reason if not self._text else None


class Seq:
    """A sequence, from arrival to retirement. Event-loop thread only."""

    def __init__(self, seq_id: int, prompt: np.ndarray, params: GenerationParams, max_tokens: int,
                 arrival: float, deadline: float, decode: Callable[[Sequence[int]], str]) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.deadline = deadline
        self.prefilled = 0
        self.generated: list[int] = []
        self.running = False
        self.done = False  # finished or cancelled: never planned again, its slot freed at the next step
        self.last_token_at = arrival
        self.detok = IncrementalDetokenizer(decode)
        self.stops = StopMatcher(params.stop)
        self.out = Output()

    @property
    def suppress_eos(self) -> bool:
        return self.params.ignore_eos or len(self.generated) < self.params.min_tokens

    def view(self) -> SeqView:
        return SeqView(self.id, len(self.prompt), self.prefilled, self.running, self.done)


class GenerateStep:
    __slots__ = ("work", "rows", "prefill_tokens")

    def __init__(self, work: ThreadStep, prefill_tokens: int) -> None:
        self.work = work
        self.rows = len(work.prefill) + len(work.decode)
        self.prefill_tokens = prefill_tokens

    def run(self, worker: ModelWorker) -> StepOutput:
        if worker.dead is not None:
            raise worker.dead
        try:
            return worker.backend.step(self.work)
        except FatalBackendError as exc:
            worker.dead = exc
            raise


class GenerateTask:
    """The scheduler loop's task for generation: at most one step in flight (each step needs the
    tokens of the one before)."""

    def __init__(self, engine: "GenerateEngine") -> None:
        self.engine = engine
        self.stats = engine.stats
        g = engine.model_config.generation
        self.params = StepParams(g.max_running_seqs, g.max_prefill_tokens, g.schedule == "prefill_first")
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self.inflight: GenerateStep | None = None
        self.wake: Callable[[], None] = lambda: None

    @property
    def waiting_count(self) -> int:
        return sum(1 for s in self.waiting if not s.done)

    @property
    def kv_tokens(self) -> int:
        return sum(s.prefilled + max(0, len(s.generated) - 1) for s in self.running.values())

    def plan(self, now: float) -> GenerateStep | None:
        if self.inflight is not None:
            return None
        for seq in self.waiting:
            if not seq.done and now > seq.deadline:  # no slot before its deadline: 504, never runs
                seq.done = True
                seq.out.end(error=DeadlineExceeded("request deadline passed before its first token"))
        plan = plan_step([s.view() for s in self.waiting], [s.view() for s in self.running.values()], self.params)
        if not plan:
            return None
        work = ThreadStep(free=list(plan.free))
        for seq_id in plan.free:
            del self.running[seq_id]
        if plan.drop or plan.admit:
            admitted = set(plan.admit)
            for seq in self.waiting:
                if seq.id in admitted:
                    seq.running = True
                    self.running[seq.id] = seq
                    work.admit.append((seq.id, seq.params.sampling))
            self.waiting = deque(s for s in self.waiting if not s.done and not s.running)
        for seq_id, start, length in plan.prefill:
            seq = self.running[seq_id]
            last = start + length == len(seq.prompt)
            work.prefill.append((seq_id, seq.prompt[start:start + length], start, last, seq.suppress_eos))
        for seq_id in plan.decode:
            seq = self.running[seq_id]
            work.decode.append((seq_id, seq.generated[-1], len(seq.prompt) + len(seq.generated) - 1,
                                seq.suppress_eos))
        self.inflight = GenerateStep(work, plan.prefill_tokens)
        return self.inflight

    def finish(self, step: GenerateStep, outcome: StepOutput | BaseException) -> None:
        self.inflight = None
        if isinstance(outcome, BaseException):
            self._step_failed(step, outcome)
            return
        now = time.monotonic()
        for seq_id, chunk, _, _, _ in step.work.prefill:
            seq = self.running.get(seq_id)
            if seq is not None:
                seq.prefilled += len(chunk)
        for seq_id, token in outcome.tokens.items():
            seq = self.running.get(seq_id)
            if seq is not None and not seq.done:
                self._token(seq, token, now)
        self.stats.step_finished(step.rows, step.prefill_tokens + len(step.work.decode), outcome.model_s)

    def _token(self, seq: Seq, token: int, now: float) -> None:
        self.stats.token(now - seq.last_token_at, first=not seq.generated)
        seq.last_token_at = now
        seq.generated.append(token)
        if token in self.engine.backend.eos_ids:  # only sampled when not suppressed
            self._retire(seq, "stop")
            return
        seq.out.push(seq.stops.feed(seq.detok.add(token)))
        if seq.stops.stopped:
            self._retire(seq, "stop")
        elif len(seq.generated) >= seq.max_tokens:
            self._retire(seq, "length")

    def _retire(self, seq: Seq, reason: str) -> None:
        if not seq.stops.stopped:  # the held-back tail is text too, unless a stop string cut it
            seq.out.push(seq.stops.feed(seq.detok.flush()) + seq.stops.flush())
        seq.done = True
        seq.out.end(reason)

    def _step_failed(self, step: GenerateStep, exc: BaseException) -> None:
        """A step that raised leaves its sequences' caches unknown: they fail (500) and leave; a
        lost device kills the engine."""
        fatal = isinstance(exc, FatalBackendError) or self.engine.worker.dead is not None
        if fatal:
            self.engine._die(exc)
            return
        log.error("generation step failed: %r", exc)
        ids = {seq_id for seq_id, *_ in step.work.prefill} | {seq_id for seq_id, *_ in step.work.decode}
        for seq_id in ids:
            seq = self.running.get(seq_id)
            if seq is not None:
                seq.done = True
                seq.out.end(error=InferenceFailed("the model failed on this sequence's step"))
        self.wake()

    def abandon(self, step: GenerateStep) -> None:
        self.inflight = None

    def cancel(self, seq: Seq) -> None:
        """The client left or timed out: the sequence leaves at the next step, its slot freed."""
        if not seq.done:
            seq.done = True
            self.wake()

    def fail_all(self, exc: BatchdError) -> None:
        for seq in [*self.waiting, *self.running.values()]:
            seq.done = True
            seq.out.end(error=exc)


class GenerateEngine(Engine):
    kind = "generate"

    def __init__(self, server: ServerConfig, model: ModelConfig, backend: GenerateBackend | None = None,
                 metrics: ModelMetrics | None = None) -> None:
        if backend is None:
            if model.backend == "fake":
                from ..backends.fake import FakeGenerateBackend
                backend = FakeGenerateBackend(model)
            else:
                backend = GenerateBackend(model)
        super().__init__(server, model, backend, metrics)  # type: ignore[arg-type]
        self.stats = GenerationStats(lambda: self.task.waiting_count, lambda: len(self.task.running),
                                     lambda: self.task.kv_tokens / self.backend.kv_capacity, self.metrics)
        self.task = GenerateTask(self)
        self.task.wake = self.build_loop(self.task).wake
        self._ids = itertools.count()

    def fail_waiting(self, exc: BatchdError) -> None:
        self.task.fail_all(exc)

    def snapshot(self) -> dict:
        return {**super().snapshot(), "kv_cache_tokens": self.backend.kv_capacity,
                "max_running_seqs": self.model_config.generation.max_running_seqs}

    def check_prompt(self, prompt: np.ndarray, max_tokens: int | None, param: str) -> int:
        """The completion budget: the prompt plus max_tokens must fit one sequence's KV slot."""
        limit = self.backend.max_length
        if len(prompt) == 0:
            raise InvalidRequest("the prompt must not be empty", param=param)
        if len(prompt) >= limit or (max_tokens is not None and len(prompt) + max_tokens > limit):
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt)} and "
                f"max_tokens asks for {max_tokens if max_tokens is not None else 'at least 1'}",
                param="max_tokens" if len(prompt) < limit else param, code="context_length_exceeded")
        return max_tokens if max_tokens is not None else limit - len(prompt)

    def submit(self, prompt: np.ndarray, params: GenerationParams, max_tokens: int, deadline: float) -> Seq:
        self.check_accepting()
        g = self.model_config.generation
        if self.task.waiting_count >= g.max_queue:
            raise Overloaded(f"queue full: {self.task.waiting_count} sequences waiting (max_queue={g.max_queue})",
                             headers={"Retry-After": "1"})
        now = time.monotonic()
        seq = Seq(next(self._ids), prompt, params, max_tokens, now, deadline, self.backend.decode_text)
        self.task.waiting.append(seq)
        self.task.wake()
        return seq

    def admit(self, prompt: np.ndarray, params: GenerationParams, max_tokens: int, deadline: float,
              tokenize_s: float = 0.0) -> Seq:
        """Admit a sequence (or refuse it, counted by reason). Its `stream` must be read to the end
        or closed: that is where the request is counted and a sequence nobody reads is dropped."""
        try:
            seq = self.submit(prompt, params, max_tokens, deadline)
        except BatchdError as exc:
            self.stats.request_rejected(exc.code or type(exc).__name__)
            raise
        self.stats.request_accepted(1, tokenize_s, len(prompt))
        self.active_requests += 1
        return seq

    async def stream(self, seq: Seq, client_gone: asyncio.Future | None = None
                     ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason or None) until the sequence ends. When the reader stops early
        (client gone, timeout, shutdown) the sequence leaves the running batch at the next step."""
        def stopped() -> None:
            seq.out.end(error=ShuttingDown("the server shut down before this request finished"))

        def client_left(_: asyncio.Future) -> None:
            seq.out.end(error=ClientDisconnected("client disconnected"))

        self.stopping.add(stopped)
        if client_gone is not None:
            client_gone.add_done_callback(client_left)
        outcome, reason = "failed", None
        try:
            while True:
                text, finish = await seq.out.next()
                if finish is not None:
                    outcome = "completed"  # the reader may close us at this last yield
                yield text, finish
                if finish is not None:
                    return
        except BaseException as exc:
            if outcome != "completed":  # a reader closing us at the last chunk is not a cancellation
                outcome, reason = ending_of(exc)
            raise
        finally:
            self.stopping.discard(stopped)
            if client_gone is not None:
                client_gone.remove_done_callback(client_left)
            self.task.cancel(seq)
            self.active_requests -= 1
            self.stats.request_finished(outcome, time.monotonic() - seq.arrival, reason)
