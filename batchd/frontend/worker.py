"""A front-end process: Hypercorn + the Starlette app on the shared listening socket; its engines
are RemoteEngines talking to the engine process.

    python -m batchd.frontend.worker CONFIG.json SOCKET_PATH LISTEN_FD

Shutdown: on SIGTERM/SIGINT it keeps serving (new requests get 503 shutting_down once the engine
says it is draining) until the engine sends Drained, then lets Hypercorn finish and exits 0. When
the engine process is gone, every request gets 503 engine_dead until the supervisor stops it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import msgspec
from hypercorn.asyncio import serve

from ..api.app import create_app
from ..config import Config
from ..server import hypercorn_config, run_loop
from .client import EngineClient

log = logging.getLogger("batchd.frontend")


async def serve_front_end(config: Config, socket_path: str, listen_fd: int) -> None:
    client = EngineClient(config, socket_path)
    app = create_app(config, remote=client)
    hc = hypercorn_config(config, f"fd://{listen_fd}")
    shutdown = asyncio.Event()
    stop_requested = False

    def on_signal() -> None:
        nonlocal stop_requested
        stop_requested = True
        if client.lost or client.drained:
            shutdown.set()

    async def follow_engine() -> None:
        await client.ended.wait()  # Drained, or the engine process is gone
        while not (client.drained or stop_requested):
            await asyncio.sleep(0.05)
        shutdown.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    follower = asyncio.create_task(follow_engine())
    try:
        await serve(app, hc, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
    finally:
        follower.cancel()


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    config_path, socket_path, listen_fd = argv[0], argv[1], int(argv[2])
    logging.basicConfig(level=os.environ.get("BATCHD_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[front {os.getpid()}]: %(message)s")
    with open(config_path, "rb") as f:
        config = msgspec.json.decode(f.read(), type=Config)
    run_loop(serve_front_end(config, socket_path, listen_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
