"""Does batchd scale out on Ray Serve? `python -m benchmarks.ray_scaling` (pip install .[ray]).

The fake backend sleeps like an accelerator (`fake_batch_ms` per batch of up to `max_batch_size`:
50 ms and 8, so one replica's model tops out at 160 texts/s) and leaves the CPU to HTTP and Ray.
All on 127.0.0.1, one local Ray cluster started and stopped here:

  1. start-up: the Ray cluster (ray.init), then Serve and 2 replicas until ready (serve.run)
  2. closed loop through Ray's proxy with 2 replicas, then 1 (the same deployment scaled down), at
     the same concurrency, for two request shapes:
       single: one text per request (c=64): batchd batches across requests
       batch8: eight texts per request (c=16): one request fills a batch
     the 2/1 throughput ratio of each, and Ray's CPU per request by process (proxy, replicas)
  3. c=1 latency through Ray's proxy against a plain `batchd serve` of the same config
     (batchd.testing.ServerProcess): what the proxy adds

Ray Serve spends about 15 ms of CPU per request in its proxy and replica on a small VM (measured
here with a bare Starlette deployment too, so it is Ray's, not batchd's). On 2 cores that caps the
single-text shape near 110 requests/s for any number of replicas, below one replica's 160: there
the replicas are not model-bound and a second one cannot help. The batch8 shape is model-bound
(20 requests/s per replica), and the target (--target, 1.7x) applies to it. Exit status 1 when missed.

Every load point is bounded in seconds and requests (benchmarks.loadgen, its own process). Only what
is started here is stopped: the plain server by its PID, Ray by serve.shutdown() and ray.shutdown().
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchd.config import load_config
from batchd.testing import ROOT, ServerProcess, descendants, process_stats

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
request_timeout_s = 30

[[models]]
name = "fake"
backend = "fake"
fake_batch_ms = {batch_ms}

[models.batching]
max_batch_size = {batch_size}

[ray]
num_cpus = 0.5
metrics_export_port = {metrics_port}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(port: int, bodies: Path, concurrency: int, duration_s: float, warmup_s: float,
          max_requests: int) -> dict:
    """One closed-loop point by benchmarks.loadgen in its own process (bounded in time and requests)."""
    spec = {"host": "127.0.0.1", "port": port, "bodies": str(bodies), "mode": "closed",
            "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
            "max_requests": max_requests, "timeout_s": 30.0, "drain_s": 10.0}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", f.name], cwd=ROOT, capture_output=True,
                              text=True, timeout=duration_s + 60)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process below this one, with its title (Ray names its actors'
    processes ray::ProxyActor, ray::ServeReplica:..., so the cost of each part shows)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = process_stats()
    out = {}
    for pid in descendants(os.getpid(), stats):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stats[pid]
        out[pid] = (title.split()[0] if title else "?", (int(fields[11]) + int(fields[12])) / tick)
    return out


def _cpu_ms_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU ms per answered request of each kind of process alive through the point (Ray's parts)."""
    per: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        if pid in before and "loadgen" not in title:
            name = "ray::ServeReplica" if title.startswith("ray::ServeReplica") else title.split(".")[0]
            name = name.rsplit("/", 1)[-1]
            per[name] = per.get(name, 0.0) + (cpu - before[pid][1]) * 1e3 / max(requests, 1)
    return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def _point(name: str, out: dict, cpu: dict | None = None) -> dict:
    row = {"point": name, "req_s": round(out["req_s"], 1), "texts_s": round(out["texts_s"], 1), "p50_ms": out["p50_ms"] and round(out["p50_ms"], 2),
           "p99_ms": out["p99_ms"] and round(out["p99_ms"], 2), "ok": out["ok"], "errors": out["errors"]}
    if cpu:
        row["cpu_ms_per_request"] = cpu
    print(json.dumps(row), flush=True)
    return row


def _measured(name: str, port: int, bodies: Path, concurrency: int, duration_s: float) -> dict:
    before = _cpu_by_process()
    out = _load(port, bodies, concurrency, duration_s, 1.0, 200_000)
    return _point(name, out, _cpu_ms_per_request(before, _cpu_by_process(), out["ok"]))


def _bodies(path: Path, texts_per_request: int) -> Path:
    with open(path, "w") as f:  # short distinct texts: the fake model's time does not depend on them
        for i in range(1000):
            texts = [f"scaling text {i}.{j} " + "word " * ((i + j) % 9) for j in range(texts_per_request)]
            body = json.dumps({"input": texts if texts_per_request > 1 else texts[0], "model": "fake"})
            f.write(json.dumps({"body": body, "texts": texts_per_request, "tokens": 10 * texts_per_request}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-ms", type=float, default=50.0, help="fake model time per batch")
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load point")
    parser.add_argument("--target", type=float, default=1.7, help="the 2/1 replica ratio the batch8 shape must reach")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from batchd.ray.deployment import APP_NAME, build_app
    from batchd.ray.proxy import CLUSTER_ENV

    work = Path(tempfile.mkdtemp(prefix="batchd-ray-bench-"))
    config_path = work / "config.toml"
    config_path.write_text(CONFIG.format(port=_free_port(), batch_ms=args.batch_ms, batch_size=args.batch_size,
                                         metrics_port=_free_port()))
    config = load_config(config_path)
    port = config.server.port
    shapes = {"single": (_bodies(work / "single.jsonl", 1), 64),
              f"batch{args.batch_size}": (_bodies(work / "batch.jsonl", args.batch_size), 16)}
    report: dict = {"config": {"fake_batch_ms": args.batch_ms, "max_batch_size": args.batch_size,
                               "duration_s": args.duration},
                    "model_ceiling_texts_s_per_replica": round(args.batch_size / (args.batch_ms / 1e3), 1)}
    points: dict[str, dict] = {}
    for key, value in CLUSTER_ENV.items():  # as `batchd ray` starts its cluster
        os.environ.setdefault(key, value)
    began = time.monotonic()
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    report["ray_cluster_start_s"] = round(time.monotonic() - began, 2)
    try:
        for replicas in (2, 1):
            began = time.monotonic()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config, replicas=replicas), name=APP_NAME, route_prefix="/")
            if replicas == 2:
                report["deployment_ready_s"] = round(time.monotonic() - began, 2)
            else:
                time.sleep(3)  # scaled down in place: the stopped replica has drained, the router knows
            for shape, (bodies, concurrency) in shapes.items():
                _load(port, bodies, concurrency, 2.0, 0.0, 2000)  # warm: connections, routers, cost models
                points[f"{shape} {replicas}"] = _measured(f"ray, {replicas} replica(s), {shape}, c={concurrency}",
                                                          port, bodies, concurrency, args.duration)
            if replicas == 2:
                points["c1 ray"] = _point("ray, 2 replicas, single, c=1",
                                          _load(port, shapes["single"][0], 1, args.duration / 2, 0.5, 20_000))
    finally:
        serve.shutdown()
        ray.shutdown()
    # the plain server once Ray is gone, so that it has the machine to itself as Ray had
    with ServerProcess.batchd(config=str(config_path), log_level="error") as plain:
        plain.wait_ready(60)
        _load(plain.port, shapes["single"][0], 1, 1.0, 0.0, 200)
        points["c1 plain"] = _point("plain batchd, single, c=1",
                                    _load(plain.port, shapes["single"][0], 1, args.duration / 2, 0.5, 20_000))
    report["points"] = list(points.values())
    report["ratio_2_vs_1"] = {shape: round(points[f"{shape} 2"]["texts_s"] / max(points[f"{shape} 1"]["texts_s"], 1e-9), 2)
                              for shape in shapes}
    report["proxy_added_p50_ms_at_c1"] = round(points["c1 ray"]["p50_ms"] - points["c1 plain"]["p50_ms"], 2)
    print(json.dumps(report, indent=2))
    ratio = report["ratio_2_vs_1"][f"batch{args.batch_size}"]
    ok = ratio >= args.target
    print(f"{'PASS' if ok else 'FAIL'}: 2 replicas = {ratio}x one replica when the model is the bottleneck "
          f"(target {args.target}x; one text per request: {report['ratio_2_vs_1']['single']}x); the proxy adds "
          f"{report['proxy_added_p50_ms_at_c1']} ms at c=1 (p50); Ray cluster {report['ray_cluster_start_s']} s "
          f"+ deployment {report['deployment_ready_s']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
