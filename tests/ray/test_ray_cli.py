"""`batchd ray`: starts a local Ray cluster, serves two replicas on the config's port through Ray's
proxy, and on SIGTERM stops the deployment and every process it started, exiting 0."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="Ray tests need Ray Serve: pip install .[ray]")

from batchd.testing import ROOT, descendants  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_batchd_ray_serves_two_replicas_and_sigterm_stops_everything_it_started(tmp_path):
    port = _free_port()
    config = tmp_path / "config.toml"
    config.write_text(f"""
[server]
port = {port}
[[models]]
name = "fake"
backend = "fake"
fake_batch_ms = 20
[ray]
num_cpus = 0.5
metrics_export_port = {_free_port()}
""")
    log_path = tmp_path / "batchd-ray.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "batchd", "ray", "--config", str(config), "--replicas", "2"],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        give_up = time.monotonic() + 120
        while "batchd serving on" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < give_up, "batchd ray did not start in 120 s: " + log_path.read_text()[-3000:]
            time.sleep(0.2)
        instances = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            for i in range(40):
                r = client.post("/v1/embeddings", json={"input": f"cli {i}"})
                assert r.status_code == 200
                instances.add(r.headers["x-batchd-instance"])
                if len(instances) == 2:
                    break
            assert client.get("/health").status_code == 200
        assert len(instances) == 2, instances
        started = descendants(proc.pid)
        assert len(started) >= 5, started  # at least GCS, raylet, controller, proxy, replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        give_up = time.monotonic() + 15  # ray.shutdown() has signalled them; let them finish exiting
        while any(_alive(pid) for pid in started) and time.monotonic() < give_up:
            time.sleep(0.2)
        assert not [pid for pid in started if _alive(pid)], "Ray processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
