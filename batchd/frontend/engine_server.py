"""The engine process: today's engines (one queue, scheduler coroutine and model thread per model),
fed by messages from every front end over a Unix socket.

Each request that arrives becomes the same call a route makes in one process (`engine.embed`,
`engine.admit` + `engine.stream`), so admission, 429/Retry-After, deadlines, cancellation and
stats are decided here, once for the whole server. A front end that disconnects (it died) has every
request of its cancelled, as if each client had gone away.

    python -m batchd.frontend.engine_server CONFIG.json SOCKET_PATH
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import msgspec
import numpy as np
from prometheus_client import generate_latest

from .. import ipc
from ..api.models import ServedModels
from ..backends.generate import Sampling
from ..config import Config
from ..engine import make_engine
from ..errors import BatchdError, InferenceFailed
from ..metrics import PrometheusMetrics
from ..server import run_loop

log = logging.getLogger("batchd.engine_server")
STATE_POLL_S = 0.02


class FrontEndConn:
    """One front end's connection: its requests in flight, by request id."""

    def __init__(self, server: "EngineServer") -> None:
        self.server = server
        self.channel = ipc.Channel(self.on_message, self.on_lost)
        self.gone: dict[int, asyncio.Future] = {}  # rid -> resolved when that request's client is gone
        self.tasks: set[asyncio.Task] = set()

    def on_message(self, msg: object) -> None:
        server = self.server
        if isinstance(msg, ipc.Embed):
            self._spawn(msg.rid, server.embed(self, msg))
        elif isinstance(msg, ipc.Generate):
            server.generate(self, msg)
        elif isinstance(msg, ipc.Cancel):
            gone = self.gone.get(msg.rid)
            if gone is not None and not gone.done():
                gone.set_result(None)
        elif isinstance(msg, ipc.Reject):
            engine = server.served.by_name.get(msg.model)
            if engine is not None:
                engine.stats.request_rejected(msg.reason)
        elif isinstance(msg, ipc.Counts):
            for model, metric, label, amount in msg.items:
                server.served.metrics_for(model).inc(metric, amount, label=label or None)
        elif isinstance(msg, ipc.Query):
            self.channel.send(ipc.Reply(msg.rid, server.query(msg.what)))

    def _spawn(self, rid: int, coro) -> None:
        self.gone[rid] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_lost(self) -> None:
        """The front end is gone (it died, or exits after a drain): its requests have no reader."""
        for gone in self.gone.values():
            if not gone.done():
                gone.set_result(None)
        self.server.conns.discard(self)


class EngineServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.exporter = PrometheusMetrics()
        self.engines = [make_engine(config, m, self.exporter.for_model(m.name)) for m in config.models]
        self.served = ServedModels(self.engines)
        self.conns: set[FrontEndConn] = set()
        self._last_states: dict = {}

    # ---- requests ----------------------------------------------------------------------------------
    async def embed(self, conn: FrontEndConn, msg: ipc.Embed) -> None:
        engine = self.served.by_name[msg.model]
        try:
            token_ids = ipc.unpack_ids(msg.ids, msg.lengths)
            results = await engine.embed(token_ids, msg.deadline, conn.gone[msg.rid], msg.tokenize_s)
        except BatchdError as exc:
            conn.channel.send(ipc.failed(msg.rid, exc))
            return
        except Exception:  # a bug here must not leave the front end waiting until its deadline
            log.exception("embedding request failed")
            conn.channel.send(ipc.failed(msg.rid, InferenceFailed("internal error")))
            return
        finally:
            conn.gone.pop(msg.rid, None)
        vectors = np.stack([r.vector for r in results]).astype(np.float32, copy=False)
        conn.channel.send(ipc.Vectors(msg.rid, vectors.tobytes(), vectors.shape[1],
                                      [r.queue_s for r in results], [r.inference_s for r in results],
                                      [r.batch_size for r in results], [r.batch_padding for r in results]))

    def generate(self, conn: FrontEndConn, msg: ipc.Generate) -> None:
        from ..generate.engine import GenerationParams

        engine = self.served.by_name[msg.model]
        params = GenerationParams(msg.max_tokens_asked, msg.min_tokens, msg.ignore_eos, msg.stop,
                                  Sampling(msg.temperature, msg.top_p, msg.seed))
        prompt = np.frombuffer(msg.prompt, dtype=np.int64)
        try:
            seq = engine.admit(prompt, params, msg.max_tokens, msg.deadline, msg.tokenize_s)
        except BatchdError as exc:
            conn.channel.send(ipc.failed(msg.rid, exc))
            return
        conn._spawn(msg.rid, self._stream(conn, msg.rid, engine, seq))

    async def _stream(self, conn: FrontEndConn, rid: int, engine, seq) -> None:
        """One Delta per step (the engine's collector merges steps only when this reader lags)."""
        chunks = engine.stream(seq, conn.gone[rid])
        try:
            async for text, finish in chunks:
                conn.channel.send(ipc.Delta(rid, text, finish, len(seq.generated)))
        except BatchdError as exc:
            conn.channel.send(ipc.failed(rid, exc))
        finally:
            await chunks.aclose()
            conn.gone.pop(rid, None)

    def query(self, what: str) -> bytes:
        if what == "metrics":
            return generate_latest(self.exporter.registry)
        if what == "reset":
            self.served.reset_all()
            return b"{}"
        return self.served.stats_json()

    # ---- state, lifecycle ---------------------------------------------------------------------------
    def states(self) -> dict[str, tuple[str, str | None]]:
        return {e.name: (e.state, e.failure) for e in self.engines}

    async def publish_states(self) -> None:
        """Every front end holds the engines' states (check_accepting, /health without a round trip):
        pushed on every change."""
        while True:
            states = self.states()
            if states != self._last_states:
                self._last_states = states
                for conn in list(self.conns):
                    conn.channel.send(ipc.State(states))
            await asyncio.sleep(STATE_POLL_S)

    def accept(self) -> ipc.Channel:
        conn = FrontEndConn(self)
        self.conns.add(conn)
        conn.channel.on_connect = lambda: conn.channel.send(ipc.State(self.states()))
        return conn.channel

    async def run(self, socket_path: str) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_unix_server(self.accept, socket_path, backlog=256)
        loading = [asyncio.create_task(e.start()) for e in self.engines]
        publisher = asyncio.create_task(self.publish_states())
        await stop.wait()
        timeout = self.config.server.drain_timeout_s
        log.info("signal received: draining (up to %.0f s)", timeout)
        drained = await asyncio.gather(*(e.drain(timeout) for e in self.engines))
        log.info("drained: %s", "all accepted requests answered" if all(drained) else "timed out")
        for conn in list(self.conns):
            conn.channel.send(ipc.Drained())
        give_up = time.monotonic() + 10.0  # front ends finish writing their last answers, then leave
        while self.conns and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        publisher.cancel()
        server.close()
        for task in loading:
            task.cancel()
        await asyncio.gather(*(e.close() for e in self.engines))
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    config_path, socket_path = argv[0], argv[1]
    logging.basicConfig(level=os.environ.get("BATCHD_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    with open(config_path, "rb") as f:
        config = msgspec.json.decode(f.read(), type=Config)
    server = EngineServer(config)
    return run_loop(server.run(socket_path))  # uvloop, as the front ends


if __name__ == "__main__":
    sys.exit(main())
