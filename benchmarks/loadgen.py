"""A lean HTTP/1.1 keep-alive load generator (its own process; `python -m benchmarks.loadgen SPEC.json`).

Why not httpx: it tops out near 1k requests/s per core, which would make the client the bottleneck.
Here every request is pre-encoded to bytes once, each connection is a raw asyncio stream (the client
in http_client.py), and a response is read as headers + Content-Length bytes; the body is not parsed
(a few are checked).

Modes
  closed: `concurrency` connections, each sends its next request as soon as the previous answers.
  open:   Poisson arrivals at `rate`/s (fixed seed); latency counts from the *scheduled* arrival, so a
          slow server cannot hide queueing (no coordinated omission). Connections are reused from a
          pool of at most `max_connections`; an arrival that finds none free waits (and that wait counts).
Both stop by themselves: after `duration_s` no new request starts, and at most `max_requests` start;
in-flight requests get `drain_s` to finish, then are counted as client timeouts.

Output (stdout, one JSON object): counts, texts/tokens per second over the measured window (after
`warmup_s`), latency percentiles, status codes, and the client's own CPU use.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time

import numpy as np

from .http_client import TRANSPORT_ERRORS, Pool, connect, percentiles, request_head, with_body


def encode_requests(host: str, port: int, path: str, bodies: list[bytes]) -> list[bytes]:
    head = request_head("POST", host, port, path, {"Content-Type": "application/json", "Connection": "keep-alive"})
    return [with_body(head, b) for b in bodies]


class Recorder:
    def __init__(self, n_texts: list[int], n_tokens: list[int]) -> None:
        self.n_texts, self.n_tokens = n_texts, n_tokens
        self.rows: list[tuple[float, float, int, int]] = []  # (start, end, status, request index)
        self.errors: dict[str, int] = {}
        self.sample_bodies: list[bytes] = []

    def ok(self, start: float, end: float, status: int, idx: int, body: bytes) -> None:
        self.rows.append((start, end, status, idx))
        if status == 200 and len(self.sample_bodies) < 3:
            self.sample_bodies.append(body)
        elif status != 200 and len(self.sample_bodies) < 6:
            self.sample_bodies.append(body[:300])

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def run_closed(spec: dict, reqs: list[bytes], rec: Recorder, t0: float) -> None:
    stop_at = t0 + spec["duration_s"]
    budget = [spec["max_requests"]]
    counter = [spec.get("offset", 0)]
    timeout = spec["timeout_s"]

    async def worker() -> None:
        conn = None
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            idx = counter[0] % len(reqs)
            counter[0] += 1
            start = time.perf_counter()
            try:
                if conn is None:
                    conn = await connect(spec["host"], spec["port"])
                status, body, closing = await asyncio.wait_for(conn.call(reqs[idx]), timeout)
                rec.ok(start, time.perf_counter(), status, idx, body)
                if closing:  # a complete answer; the next request needs a new connection
                    conn.close()
                    conn = None
            except TRANSPORT_ERRORS as exc:
                rec.error(type(exc).__name__)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    # ramp connections up over ~50 ms so 512 connects do not all hit the accept queue at once
    tasks = []
    for i in range(spec["concurrency"]):
        tasks.append(asyncio.create_task(worker()))
        if i % 64 == 63:
            await asyncio.sleep(0.005)
    await asyncio.wait(tasks, timeout=spec["duration_s"] + spec["drain_s"])


async def run_open(spec: dict, reqs: list[bytes], rec: Recorder, t0: float) -> None:
    rng = random.Random(spec.get("seed", 1))
    rate, duration = spec["rate"], spec["duration_s"]
    n = min(spec["max_requests"], int(rate * duration * 1.5) + 10)
    pool = Pool(spec["host"], spec["port"], spec.get("max_connections", 1024))
    slots = asyncio.Semaphore(pool.limit)  # an arrival waits here for a connection; never skipped
    timeout = spec["timeout_s"]
    offset = spec.get("offset", 0)

    async def one(idx: int, scheduled: float) -> None:
        async with slots:  # fewer than pool.limit in flight: take() has an idle connection or opens one
            conn = None
            try:
                conn = pool.get() or await pool.take()
                status, body, closing = await asyncio.wait_for(conn.call(reqs[idx]), timeout)
                rec.ok(scheduled, time.perf_counter(), status, idx, body)
                pool.give(conn, reuse=not closing)
            except TRANSPORT_ERRORS as exc:
                rec.error(type(exc).__name__)
                if conn is not None:
                    pool.give(conn, reuse=False)

    tasks = []
    at = t0
    for k in range(n):
        at += rng.expovariate(rate)
        if at > t0 + duration:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one((offset + k) % len(reqs), at)))
    if tasks:
        await asyncio.wait(tasks, timeout=spec["drain_s"])
    pool.close()
    rec.connections = pool.opened  # type: ignore[attr-defined]


def summarise(spec: dict, rec: Recorder, t0: float, t_end: float, cpu_s: float) -> dict:
    warm = t0 + spec.get("warmup_s", 0.0)
    window_end = t0 + spec["duration_s"]
    rows = np.asarray(rec.rows, dtype=np.float64).reshape(-1, 4)
    start, end, status, idx = rows[:, 0], rows[:, 1], rows[:, 2].astype(int), rows[:, 3].astype(int)
    texts = np.asarray(rec.n_texts)[idx]
    tokens = np.asarray(rec.n_tokens)[idx]
    good = status == 200
    # throughput: what completed inside the measured window; latency: what started inside it
    in_window = good & (end >= warm) & (end <= window_end)
    measured = (start >= warm) & (start <= window_end)
    window = max(1e-9, min(window_end, t_end) - warm)
    lat = (end - start)[measured & good] * 1e3
    pct = percentiles(lat, (50, 90, 99))
    codes: dict[str, int] = {}
    for s in status[measured]:
        codes[str(s)] = codes.get(str(s), 0) + 1
    n_err = int((measured & ~good).sum()) + sum(rec.errors.values())
    # per-second view: requests started in each second, and their median latency (shows stalls)
    timeline = []
    for sec in range(int(spec["duration_s"] + 0.999)):
        m = (start >= t0 + sec) & (start < t0 + sec + 1)
        lat_s = (end - start)[m] * 1e3
        timeline.append([int(m.sum()), round(float(np.median(lat_s)), 1) if len(lat_s) else None])
    return {
        "requests": int(measured.sum()) + sum(rec.errors.values()),
        "ok": int((measured & good).sum()),
        "errors": n_err,
        "client_errors": rec.errors,
        "status": codes,
        "window_s": round(window, 3),
        "req_s": float(in_window.sum() / window),
        "texts_s": float(texts[in_window].sum() / window),
        "tokens_s": float(tokens[in_window].sum() / window),
        "p50_ms": pct[0], "p90_ms": pct[1], "p99_ms": pct[2],
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "client_cpu": round(cpu_s / max(1e-9, t_end - t0), 3),  # share of one core the client used
        "connections": getattr(rec, "connections", spec.get("concurrency")),
        "timeline": timeline,
        "sample": rec.sample_bodies[0][:200].decode(errors="replace") if rec.sample_bodies else "",
        "error_sample": next((b.decode(errors="replace") for b in rec.sample_bodies if not b.startswith(b'{"object"')), ""),
    }


async def main_async(spec: dict) -> dict:
    bodies = []
    n_texts, n_tokens = [], []
    with open(spec["bodies"], "rb") as f:
        for line in f:
            item = json.loads(line)
            bodies.append(item["body"].encode())
            n_texts.append(item["texts"])
            n_tokens.append(item["tokens"])
    reqs = encode_requests(spec["host"], spec["port"], spec.get("path", "/v1/embeddings"), bodies)
    rec = Recorder(n_texts, n_tokens)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if spec["mode"] == "closed":
        await run_closed(spec, reqs, rec, t0)
    else:
        await run_open(spec, reqs, rec, t0)
    t_end = time.perf_counter()
    return summarise(spec, rec, t0, t_end, time.process_time() - cpu0)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])  # keep the client off the server's cores where possible
    out = asyncio.run(main_async(spec))
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
