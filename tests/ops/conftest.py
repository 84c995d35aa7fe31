"""A real batchd (fake backend) for tests/ops, and a real Prometheus scraping it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from batchd.testing import ServerProcess
from tests.ops.deployfiles import ALERTS, PROMETHEUS_DIR

# The server tests/ops runs: a fake embedding model and a fake generation model side by side. The
# embedding one has small batches and a short queue, so that a burst of requests overflows it (429
# queue_full), and is slow enough (20 ms a batch) that inputs queue and wait; the generation one
# takes 5 ms a step.
SERVER_CONFIG = """
[server]
request_timeout_s = 20

[[models]]
name = "fake-embed"
backend = "fake"
fake_batch_ms = 20

[models.batching]
max_batch_size = 8
max_queue = 32

[[models]]
name = "fake-gen"
backend = "fake"
task = "generate"
max_length = 128
fake_batch_ms = 5

[models.generation]
max_running_seqs = 8
"""
MODELS = tomllib.loads(SERVER_CONFIG)["models"]
EMBED_MODEL = next(m["name"] for m in MODELS if m.get("task", "embed") == "embed")
GENERATE_MODEL = next((m["name"] for m in MODELS if m.get("task") == "generate"), None)
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="session")
def batchd(tmp_path_factory):
    config = tmp_path_factory.mktemp("batchd") / "ops.toml"
    config.write_text(SERVER_CONFIG)
    with ServerProcess.batchd(config=str(config), name="batchd (ops)").wait_ready(60) as server:
        yield server


class Prometheus:
    """`prometheus` on a free loopback port with its data in a temp dir, stopped by its PID."""

    def __init__(self, config: dict, workdir: Path) -> None:
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with socket.socket() as sock:  # prometheus binds its own port: take a free one and hand it over
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def wait_ready(self, timeout: float = 30) -> Prometheus:
        give_up = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}: {self.log_text()}"
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < give_up, f"prometheus not ready in {timeout} s: {self.log_text()}"
            time.sleep(0.1)

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; fails on an error or a warning, which names the query."""
        body = self.http.get(f"/api/v1/{path}", params=params).json()
        assert body["status"] == "success" and not body.get("warnings"), f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        return self.api("query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def log_text(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(batchd, tmp_path_factory):
    """Prometheus with deploy/prometheus/prometheus.yml, made fast (1 s scrapes and rule runs) and
    pointed at the test server and the alert rules."""
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed: apt-get install -y prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"{batchd.host}:{batchd.port}"]}]
    prom = Prometheus(config, tmp_path_factory.mktemp("prometheus"))
    try:
        yield prom.wait_ready()
    finally:
        prom.stop()

