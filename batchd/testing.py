"""A real server process on a free 127.0.0.1 port, for tests, benchmarks and your own integration
tests: the port is bound here and handed down as an inherited socket (`--bind fd://N`), so there is
no race for it. The process is stopped by its own PID (SIGTERM, then SIGKILL), and logs to a temp
file, never a pipe that nobody drains.

    with ServerProcess.batchd(["model.backend=fake"]).wait_ready() as server:
        server.get("/health")
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
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class ServerProcess:
    def __init__(self, name: str, argv_for_fd: Callable[[int], list[str]], cpus: Sequence[int] | None = None,
                 env: dict[str, str] | None = None, ready_path: str = "/health") -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(4096)
        sock.set_inheritable(True)
        self.name, self.host, self.port = name, HOST, sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self.ready_path = ready_path
        self._log = tempfile.TemporaryFile("w+")
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(argv_for_fd(sock.fileno()), pass_fds=[sock.fileno()], cwd=ROOT,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)
        sock.close()

    @classmethod
    def batchd(cls, overrides: Sequence[str] = (), config: str | None = "config.toml", name: str = "batchd",
               log_level: str = "warning", models: Sequence[str] = (), **kwargs) -> "ServerProcess":
        """`python -m batchd serve`; `overrides` are `section.key=value` strings; `models` serves
        only those models of the config."""
        def argv(fd: int) -> list[str]:
            cmd = [sys.executable, "-m", "batchd", "serve", "--bind", f"fd://{fd}", "--log-level", log_level]
            if config:
                cmd += ["--config", str(ROOT / config)]
            for model in models:
                cmd += ["--model", model]
            for item in overrides:
                cmd += ["--set", item]
            return cmd
        return cls(name, argv, **kwargs)

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        give_up = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                if self.get(self.ready_path, timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > give_up:
                self.stop()
                raise RuntimeError(f"{self.name} did not become ready in {timeout} s")
            time.sleep(0.1)

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

    def rss_mb(self) -> dict[str, float]:
        """Current and peak resident memory of the process, from /proc."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = int(line.split()[1]) / 1024
        except OSError:
            pass
        return out

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (batchd drains), then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_stats() -> dict[int, list[str]]:
    """Every live process's /proc/PID/stat fields after its name (fields[1] is the parent's pid,
    fields[11] and [12] its user and system CPU ticks)."""
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
    return stats


def descendants(pid: int, stats: dict[int, list[str]] | None = None) -> set[int]:
    """Every live process below `pid`, however deep (Ray's GCS, raylet, workers, replicas...)."""
    children: dict[int, list[int]] = {}
    for child, fields in (stats if stats is not None else process_stats()).items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
