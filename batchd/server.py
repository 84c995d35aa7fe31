"""Run the app on Hypercorn; SIGTERM/SIGINT drain accepted work, then exit."""
from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .api.app import create_app
from .config import Config

log = logging.getLogger("batchd.server")


async def serve_forever(config: Config, bind: str | None = None) -> None:
    app = create_app(config)
    engines = app.state.models.engines
    hc = HypercornConfig()
    hc.bind = [bind or f"{config.server.host}:{config.server.port}"]
    hc.workers = 1  # one process: the engines (queues, schedulers, model threads) live here
    hc.graceful_timeout = config.server.drain_timeout_s
    hc.keep_alive_timeout = 75
    hc.accesslog = None
    stop = asyncio.Event()

    async def drain_then_stop() -> None:
        log.info("signal received: draining (up to %.0f s)", config.server.drain_timeout_s)
        drained = await asyncio.gather(*(e.drain(config.server.drain_timeout_s) for e in engines))
        finished = all(drained)
        log.info("drained: %s", "all accepted requests answered" if finished else "timed out")
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(drain_then_stop()))
    await serve(app, hc, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
