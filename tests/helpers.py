"""Shared test helpers: configs, an in-process app with a fake or real engine, a real server process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx

from batchd.api.app import create_app
from batchd.config import Config, config_from_dict
from batchd.engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def make_config(**sections: dict[str, Any]) -> Config:
    """A config from section dicts, e.g. make_config(model={"backend": "fake"}, batching={...})."""
    return config_from_dict({k: v for k, v in sections.items()})


def fake_config(model: dict | None = None, batching: dict | None = None, server: dict | None = None) -> Config:
    return make_config(model={"backend": "fake", "name": "fake", **(model or {})},
                       batching=batching or {}, server=server or {})


@asynccontextmanager
async def running_engine(config: Config) -> AsyncIterator[Engine]:
    engine = Engine(config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


@asynccontextmanager
async def app_client(config: Config) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    """An httpx client talking to the app in-process (no sockets), with a started engine."""
    async with running_engine(config) as engine:
        app = create_app(config, engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batchd.test", timeout=60) as client:
            yield client, engine


@contextmanager
def server_process(*overrides: str, config: str | None = "config.toml",
                   env: dict[str, str] | None = None, ready_timeout: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `python -m batchd serve` process on a free 127.0.0.1 port (bound here, passed as fd://N),
    waited on until /health is 200. Stopped by its PID (SIGTERM, then SIGKILL) afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "batchd", "serve", "--bind", f"fd://{sock.fileno()}", "--log-level", "warning"]
    if config:
        cmd += ["--config", str(ROOT / config)]
    for item in overrides:
        cmd += ["--set", item]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nobody has to drain it
    proc = subprocess.Popen(cmd, pass_fds=[sock.fileno()], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    sock.close()
    base = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > give_up:
                raise RuntimeError("server did not become ready in time")
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
