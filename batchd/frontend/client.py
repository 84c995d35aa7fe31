"""The engine client in a front-end process: one RemoteEngine per served model, with the methods and
attributes the routes use on an in-process engine (`embed`, `admit`/`stream`, `check_accepting`,
`check_prompt`, `name`, `kind`, `state`, `backend` for tokenizing, `stats.request_rejected`,
`metrics.inc`). The backend is constructed but never loaded: a front end holds the tokenizer, not
the model weights.

Everything is decided by the engine process: admission (429 and Retry-After), deadlines (504),
outcomes. A front end only forwards a client's disconnect (Cancel) and relays the answers. When the
engine process is gone, every waiting request fails with 503 engine_dead and /health turns 503.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from typing import AsyncIterator, Sequence

import numpy as np

from .. import ipc
from ..api.models import ServedModels
from ..config import Config, ModelConfig, ServerConfig
from ..engine import Engine
from ..errors import BatchdError, EngineDead, ShuttingDown
from ..types import ItemResult

log = logging.getLogger("batchd.frontend")
COUNTS_FLUSH_S = 0.2


class EngineClient:
    def __init__(self, config: Config, socket_path: str) -> None:
        self.config = config
        self.socket_path = socket_path
        self.engines: list[RemoteEngine] = [_remote_engine(self, config.server, m) for m in config.models]
        self.by_name = {e.name: e for e in self.engines}
        self.pending: dict[int, asyncio.Future | RemoteSeq] = {}
        self._rids = itertools.count()
        self.channel: ipc.Channel | None = None
        self.lost = False
        self.drained = False
        self.ended = asyncio.Event()  # set when Drained arrives or the engine is lost
        self._counts: dict[tuple[str, str, str], float] = defaultdict(float)
        self._counts_scheduled = False
        self._first_state: asyncio.Future | None = None

    # ---- connection ------------------------------------------------------------------------------
    async def connect(self, timeout: float = 120.0) -> None:
        """Connect to the engine process (it may still be starting) and wait for its first State."""
        loop = asyncio.get_running_loop()
        self._first_state = loop.create_future()
        give_up = time.monotonic() + timeout
        while True:
            try:
                _, self.channel = await loop.create_unix_connection(
                    lambda: ipc.Channel(self.on_message, self.on_lost), self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.05)
        await asyncio.wait_for(self._first_state, timeout)

    def close(self) -> None:
        if self.channel is not None:
            self._flush_counts()
            self.channel.close()

    def send(self, msg: object) -> None:
        if self.channel is not None:
            self.channel.send(msg)

    def next_rid(self) -> int:
        if self.lost:
            raise EngineDead("the engine process is gone; the server cannot serve")
        return next(self._rids)

    # ---- messages from the engine -----------------------------------------------------------------
    def on_message(self, msg: object) -> None:
        if isinstance(msg, ipc.Delta):
            seq = self.pending.get(msg.rid)
            if isinstance(seq, RemoteSeq):
                seq.n_generated = msg.generated
                seq.out.push(msg.text)
                if msg.finish is not None:
                    del self.pending[msg.rid]
                    seq.out.end(msg.finish)
        elif isinstance(msg, (ipc.Vectors, ipc.Reply)):
            future = self.pending.pop(msg.rid, None)
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_result(msg)
        elif isinstance(msg, ipc.Failed):
            self._fail(self.pending.pop(msg.rid, None), ipc.error_of(msg))
        elif isinstance(msg, ipc.State):
            for name, (state, failure) in msg.states.items():
                engine = self.by_name.get(name)
                if engine is not None:
                    engine.state, engine.failure = state, failure
            if self._first_state is not None and not self._first_state.done():
                self._first_state.set_result(None)
        elif isinstance(msg, ipc.Drained):
            self.drained = True
            self.ended.set()

    @staticmethod
    def _fail(target, exc: BatchdError) -> None:
        if isinstance(target, RemoteSeq):
            target.out.end(error=exc)
        elif isinstance(target, asyncio.Future) and not target.done():
            target.set_exception(exc)

    def on_lost(self) -> None:
        """The engine process is gone: every waiting request fails now, /health says dead."""
        self.lost = True
        if self.drained:
            exc: BatchdError = ShuttingDown("the server is shutting down")
        else:
            log.error("lost the engine process: answering 503 engine_dead")
            exc = EngineDead("the engine process is gone; the server cannot serve")
        for engine in self.engines:
            if self.drained:
                engine.state = "stopped"
            else:
                engine.state, engine.failure = "dead", "EngineProcessLost"
        pending, self.pending = self.pending, {}
        for target in pending.values():
            self._fail(target, exc)
        if self._first_state is not None and not self._first_state.done():
            self._first_state.set_exception(ConnectionError("the engine process closed the connection"))
        self.ended.set()

    # ---- counters recorded here, kept there ---------------------------------------------------------
    def count(self, model: str, metric: str, label: str | None, amount: float) -> None:
        self._counts[(model, metric, label or "")] += amount
        if not self._counts_scheduled:
            self._counts_scheduled = True
            asyncio.get_running_loop().call_later(COUNTS_FLUSH_S, self._flush_counts)

    def _flush_counts(self) -> None:
        self._counts_scheduled = False
        if self._counts:
            self.send(ipc.Counts([(m, n, label, v) for (m, n, label), v in self._counts.items()]))
            self._counts.clear()

    async def query(self, what: str) -> bytes:
        """/stats, /stats/reset and /metrics are the engine's: one round trip."""
        self._flush_counts()  # the same channel: the engine counts these before it answers
        rid = self.next_rid()
        future = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        self.send(ipc.Query(rid, what))
        try:
            reply = await asyncio.wait_for(future, 30.0)
        finally:
            self.pending.pop(rid, None)
        return reply.body


class _RemoteMetrics:
    """What the front end records (HTTP responses by status) goes to the engine's registry."""

    def __init__(self, client: EngineClient, model: str) -> None:
        self.client, self.model = client, model
        self.exporter = self

    def for_model(self, model: str) -> "_RemoteMetrics":
        return _RemoteMetrics(self.client, model)

    def inc(self, name: str, amount: float = 1.0, label: str | None = None) -> None:
        self.client.count(self.model, name, label, amount)

    def observe(self, name: str, value: float) -> None:  # engine-side series only
        pass

    def track(self, name: str, read) -> None:
        pass


class _RemoteStats:
    def __init__(self, client: EngineClient, model: str) -> None:
        self.client, self.model = client, model

    def request_rejected(self, reason: str) -> None:
        self.client.send(ipc.Reject(self.model, reason))


class RemoteEngine:
    kind = "embed"
    check_accepting = Engine.check_accepting

    def __init__(self, client: EngineClient, server: ServerConfig, model: ModelConfig, backend) -> None:
        self.client = client
        self.server_config = server
        self.model_config = model
        self.name = model.name
        self.backend = backend  # constructed, never loaded: tokenizer and sizes only
        self.state = "loading"
        self.failure: str | None = None
        self.metrics = _RemoteMetrics(client, model.name)
        self.stats = _RemoteStats(client, model.name)


class RemoteEmbedEngine(RemoteEngine):
    kind = "embed"

    def __init__(self, client: EngineClient, server: ServerConfig, model: ModelConfig) -> None:
        from ..backends import make_backend

        super().__init__(client, server, model, make_backend(model))
        self.batching = model.batching

    async def embed(self, token_ids: Sequence[np.ndarray], deadline: float,
                    client_gone: asyncio.Future | None = None, tokenize_s: float = 0.0) -> list[ItemResult]:
        client = self.client
        rid = client.next_rid()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        client.pending[rid] = future
        ids, lengths = ipc.pack_ids(list(token_ids))
        client.send(ipc.Embed(rid, self.name, ids, lengths, deadline, tokenize_s))

        def gone(_: asyncio.Future) -> None:
            client.send(ipc.Cancel(rid))

        if client_gone is not None:
            client_gone.add_done_callback(gone)
        try:
            msg = await future
        finally:
            if client_gone is not None:
                client_gone.remove_done_callback(gone)
            if not future.done():  # this handler was cancelled: the engine drops the inputs
                client.pending.pop(rid, None)
                client.send(ipc.Cancel(rid))
        vectors = np.frombuffer(msg.data, dtype=np.float32).reshape(-1, msg.dim)
        return [ItemResult(vectors[i], msg.queue_s[i], msg.inference_s[i], msg.batch_size[i], msg.padding[i])
                for i in range(len(vectors))]


class RemoteSeq:
    """A sequence running in the engine process: its deltas arrive in `out`."""
    __slots__ = ("rid", "out", "n_generated")

    def __init__(self, rid: int) -> None:
        from ..generate.engine import Output

        self.rid = rid
        self.out = Output()
        self.n_generated = 0

    @property
    def generated(self) -> range:  # the routes read len(seq.generated)
        return range(self.n_generated)


class RemoteGenerateEngine(RemoteEngine):
    kind = "generate"

    def __init__(self, client: EngineClient, server: ServerConfig, model: ModelConfig) -> None:
        from ..generate.engine import GenerateEngine

        if model.backend == "fake":
            from ..backends.fake import FakeGenerateBackend
            backend = FakeGenerateBackend(model)
        else:
            from ..backends.generate import GenerateBackend
            backend = GenerateBackend(model)  # tokenizer and config; the weights load in the engine
        super().__init__(client, server, model, backend)
        self._check_prompt = GenerateEngine.check_prompt

    def check_prompt(self, prompt: np.ndarray, max_tokens: int | None, param: str) -> int:
        return self._check_prompt(self, prompt, max_tokens, param)  # only reads self.backend

    def admit(self, prompt: np.ndarray, params, max_tokens: int, deadline: float,
              tokenize_s: float = 0.0) -> RemoteSeq:
        """Sends the sequence; the engine admits or refuses it, and a refusal is the stream's first item."""
        client = self.client
        seq = RemoteSeq(client.next_rid())
        client.pending[seq.rid] = seq
        s = params.sampling
        client.send(ipc.Generate(seq.rid, self.name, np.ascontiguousarray(prompt, dtype=np.int64).tobytes(),
                                 max_tokens, params.max_tokens, params.min_tokens, params.ignore_eos,
                                 list(params.stop), s.temperature, s.top_p, s.seed, deadline, tokenize_s))
        return seq

    async def stream(self, seq: RemoteSeq, client_gone: asyncio.Future | None = None
                     ) -> AsyncIterator[tuple[str, str | None]]:
        client = self.client

        def gone(_: asyncio.Future) -> None:
            client.send(ipc.Cancel(seq.rid))

        if client_gone is not None:
            client_gone.add_done_callback(gone)
        try:
            while True:
                text, finish = await seq.out.next()
                yield text, finish
                if finish is not None:
                    return
        finally:
            if client_gone is not None:
                client_gone.remove_done_callback(gone)
            if not seq.out.ended:  # the reader stopped early: the sequence leaves at the next step
                client.pending.pop(seq.rid, None)
                client.send(ipc.Cancel(seq.rid))


def _remote_engine(client: EngineClient, server: ServerConfig, model: ModelConfig) -> RemoteEngine:
    if model.kind == "generate":
        return RemoteGenerateEngine(client, server, model)
    return RemoteEmbedEngine(client, server, model)


class RemoteServed(ServedModels):
    """The served models of a front end: /stats, /stats/reset and /metrics come from the engine."""

    def __init__(self, client: EngineClient) -> None:
        super().__init__(client.engines)  # type: ignore[arg-type]
        self.client = client

    async def stats_body(self) -> bytes:
        return await self.client.query("stats")

    async def reset_stats(self) -> None:
        await self.client.query("reset")

    async def metrics_body(self, registry) -> bytes:
        return await self.client.query("metrics")

    def metrics_for(self, name: str):
        engine = self.by_name.get(name)
        return engine.metrics if engine is not None else _RemoteMetrics(self.client, name)

    def registry(self):
        return None


__all__ = ["EngineClient", "RemoteServed"]
