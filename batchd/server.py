"""Run the app on Hypercorn; SIGTERM/SIGINT drain accepted work, then exit.

`server.workers = 1` (the default): one process, the engines in it, no IPC. `server.workers = N > 1`:
a supervisor with N front-end processes and one engine process (batchd/frontend)."""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from wsgiref.handlers import format_date_time

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .api.app import create_app
from .config import Config

log = logging.getLogger("batchd.server")


def run(config: Config, bind: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (0 after a drain)."""
    if config.server.workers > 1:
        from .frontend.supervisor import supervise
        return supervise(config, bind or f"{config.server.host}:{config.server.port}")
    run_loop(serve_forever(config, bind))
    return 0


def run_loop(main):
    """asyncio.run on uvloop when it is installed (cheaper per request than the default loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config with the Date header formatted once a second, not on every response
    (format_date_time was ~2% of a request's CPU at c=256; an HTTP date has 1 s resolution)."""

    include_date_header = False  # Hypercorn's own, per response; ours is prepended below
    _date_second = -1
    _date = b""

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, format_date_time(now).encode("ascii")
        return [(b"date", self._date), *super().response_headers(protocol)]


def hypercorn_config(config: Config, bind: str) -> HypercornConfig:
    hc = _HypercornConfig()
    hc.bind = [bind]
    hc.workers = 1  # one process per app: the supervisor (batchd/frontend) makes more
    hc.graceful_timeout = config.server.drain_timeout_s
    hc.keep_alive_timeout = 75
    hc.backlog = 4096  # Hypercorn re-listens with its 100, which drops connects when a thousand clients arrive at once
    hc.accesslog = None
    return hc


async def serve_forever(config: Config, bind: str | None = None) -> None:
    app = create_app(config)
    engines = app.state.models.engines
    hc = hypercorn_config(config, bind or f"{config.server.host}:{config.server.port}")
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
