"""Server processes under test, each a `batchd.testing.ServerProcess`: a free 127.0.0.1 port bound
here and passed down as fd://N (no port race), stopped by its own PID: SIGTERM, then SIGKILL.

  batchd   - `python -m batchd serve --config ... --set ...`
  bare     - a bare Starlette + Hypercorn route that decodes the body and returns the same JSON shape
             (the reference for scheduler overhead with the 0-ms fake backend)
  trivial  - a raw asyncio server with a canned response: costs almost nothing, so the load generator's
             own ceiling shows against it
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from batchd.testing import ROOT, ServerProcess

__all__ = ["ROOT", "Server", "Starting", "bare", "batchd", "running", "trivial"]


# One launcher for tests, benchmarks and users: a server process on a free loopback port.
Server = Starting = ServerProcess


@contextmanager
def running(*starting: ServerProcess) -> Iterator[list[ServerProcess]]:
    """Start all (already spawned), wait until each is ready, stop all by PID at the end."""
    try:
        yield [s.wait_ready() for s in starting]
    finally:
        for s in starting:
            s.close()


def batchd(overrides: list[str], config: str = "config.toml", cpus: list[int] | None = None,
           name: str = "batchd") -> ServerProcess:
    """A batchd server for the embedding benchmark: the config's first model only (a generation
    model beside it would load and hold memory for nothing); `overrides` are `section.key=value`."""
    from batchd.config import load_config

    first = load_config(ROOT / config).model.name
    return ServerProcess.batchd(overrides, config=config, name=name, log_level="error", cpus=cpus, models=[first])


def bare(cpus: list[int] | None = None) -> ServerProcess:
    return ServerProcess("bare", lambda fd: [sys.executable, "-m", "benchmarks.refservers", "bare", str(fd)], cpus)


def trivial(cpus: list[int] | None = None) -> ServerProcess:
    return ServerProcess("trivial", lambda fd: [sys.executable, "-m", "benchmarks.refservers", "trivial", str(fd)],
                         cpus)
