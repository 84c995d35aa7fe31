"""Server processes under test, each on a free 127.0.0.1 port bound here and passed down as fd://N
(the technique of tests/helpers.py: no port race). Stopped by their own PID: SIGTERM, then SIGKILL.

  batchd   - `python -m batchd serve --config ... --set ...`
  bare     - a bare Starlette + Hypercorn route that decodes the body and returns the same JSON shape
             (the reference for scheduler overhead with the 0-ms fake backend)
  trivial  - a raw asyncio server with a canned response: costs almost nothing, so the load generator's
             own ceiling shows against it
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, name: str) -> None:
        self.proc, self.port, self.name = proc, port, name
        self.host = "127.0.0.1"

    def get(self, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stats(self) -> dict:
        status, body = self.get("/stats")
        return json.loads(body) if status == 200 else {}

    def reset_stats(self) -> None:
        self.get("/stats/reset", "POST")

    def rss_mb(self) -> dict:
        """Current and peak resident memory of the server process, from /proc."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = int(line.split()[1]) / 1024
        except OSError:
            pass
        return out


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class Starting:
    """A server process started but maybe not ready yet, so several can load at the same time."""

    def __init__(self, name: str, argv_for_fd, cpus: list[int] | None, ready_path: str = "/health",
                 env: dict | None = None) -> None:
        sock = _bound_socket()
        port = sock.getsockname()[1]
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        # stderr to a temporary file, not a pipe: a chatty server must never block on a full pipe
        self.log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(argv_for_fd(sock.fileno()), pass_fds=[sock.fileno()], cwd=ROOT, preexec_fn=preexec,
                                env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        sock.close()
        self.server = Server(proc, port, name)
        self.ready_path = ready_path

    def wait_ready(self, timeout: float = 120) -> Server:
        server, proc = self.server, self.server.proc
        give_up = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{server.name} exited with {proc.returncode}: {self.log.read()[-2000:]}")
            try:
                if server.get(self.ready_path, timeout=2)[0] == 200:
                    return server
            except OSError:
                pass
            if time.monotonic() > give_up:
                raise RuntimeError(f"{server.name} did not become ready in {timeout} s")
            time.sleep(0.1)


@contextmanager
def running(*starting: Starting) -> Iterator[list[Server]]:
    """Start all (already spawned), wait until each is ready, stop all by PID at the end."""
    try:
        yield [s.wait_ready() for s in starting]
    finally:
        for s in starting:
            stop(s.server.proc)
            s.log.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def batchd(overrides: list[str], config: str = "config.toml", cpus: list[int] | None = None,
           name: str = "batchd") -> Starting:
    """A batchd server; `overrides` are `section.key=value` strings."""
    def argv(fd: int) -> list[str]:
        cmd = [sys.executable, "-m", "batchd", "serve", "--config", str(ROOT / config),
               "--bind", f"fd://{fd}", "--log-level", "error"]
        for o in overrides:
            cmd += ["--set", o]
        return cmd
    return Starting(name, argv, cpus)


def bare(cpus: list[int] | None = None) -> Starting:
    return Starting("bare", lambda fd: [sys.executable, "-m", "benchmarks.refservers", "bare", str(fd)], cpus)


def trivial(cpus: list[int] | None = None) -> Starting:
    return Starting("trivial", lambda fd: [sys.executable, "-m", "benchmarks.refservers", "trivial", str(fd)], cpus)
