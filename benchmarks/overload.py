"""A bounded overload run against a real `batchd serve` process on 127.0.0.1.

1. Start the server (fake backend with a realistic per-batch and per-token cost by default, or the
   real model with --real), on a free 127.0.0.1 port bound here and passed down as fd://N.
2. Saturated throughput: a closed loop of --concurrency clients for --sat-seconds.
3. Overload: an open loop offering --factor x the saturated rate for --seconds (arrivals on a fixed
   schedule, whatever the server answers), each request with x-request-timeout: --timeout.
4. Report: accepted throughput vs saturated, share of 429s (by reason), p50/p99 latency of accepted
   requests, server RSS before/after (VmRSS from /proc/PID/status), and the server's own counters.

Bounded in time and connections, stops by itself, talks only to 127.0.0.1, ends only the process it
started (by PID). Run: `python -m benchmarks.overload` or `python benchmarks/overload.py [--help]`.
The client is the load generator's (benchmarks/http_client.py): keep-alive HTTP/1.1 over raw asyncio
streams, cheaper than httpx, so that on a small machine the load generator is not the bottleneck.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/overload.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchd.testing import ServerProcess
from benchmarks.http_client import TRANSPORT_ERRORS, Pool, connect, percentiles

HOST = "127.0.0.1"
WORDS = ("server batch queue latency token model thread vector padding bucket budget client request "
         "future scheduler throughput deadline overload admission retry drain").split()


# ---- the server ------------------------------------------------------------------------------------
def start_server(args: argparse.Namespace) -> ServerProcess:
    sets = [f"server.request_timeout_s={args.server_timeout}", f"batching.max_queue={args.max_queue}"]
    if args.real:
        sets += ["model.device=cpu"]
    else:
        sets += ["model.backend=fake", "model.name=fake", f"model.fake_batch_ms={args.fake_batch_ms}",
                 f"model.fake_token_us={args.fake_token_us}"]
    try:
        return ServerProcess.batchd(sets).wait_ready(args.ready_timeout)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


# ---- the load --------------------------------------------------------------------------------------
async def get(port: int, path: str) -> tuple[int, bytes]:
    conn = await connect(HOST, port)
    try:
        status, _, body = await asyncio.wait_for(conn.request("GET", path), timeout=10)
        return status, body
    finally:
        conn.close()


def make_body(rng: random.Random) -> bytes:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 20)))
    return json.dumps({"input": text}).encode()


class Tally:
    def __init__(self) -> None:
        self.status: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        self.latency_ok: list[float] = []
        self.last_ok = 0.0  # time.monotonic() of the last 200
        self.latency_429: list[float] = []
        self.retry_after: list[int] = []
        self.errors: Counter[str] = Counter()
        self.skipped = 0  # arrivals with no connection free (client-side limit): not sent


async def one(pool: Pool, body: bytes, headers: dict[str, str], tally: Tally, due: float) -> None:
    conn = await pool.take()
    if conn is None:
        tally.skipped += 1
        return
    healthy = False
    try:
        status, hdrs, payload = await asyncio.wait_for(conn.request("POST", "/v1/embeddings", body, headers), 60)
        healthy = hdrs.get("connection", "").lower() != "close"
    except TRANSPORT_ERRORS as exc:
        tally.errors[type(exc).__name__] += 1
        return
    finally:
        pool.give(conn, healthy)
    elapsed = time.monotonic() - due  # from the scheduled arrival: client lag counts against us
    tally.status[status] += 1
    if status == 200:
        tally.latency_ok.append(elapsed)
        tally.last_ok = max(tally.last_ok, time.monotonic())
    elif status == 429:
        tally.latency_429.append(elapsed)
        tally.reasons[json.loads(payload)["error"]["code"]] += 1
        tally.retry_after.append(int(hdrs.get("retry-after", "0")))
    else:
        tally.reasons[f"{status}:{json.loads(payload)['error']['code']}"] += 1


async def closed_loop(port: int, concurrency: int, seconds: float, headers: dict[str, str]) -> tuple[Tally, float]:
    tally, pool = Tally(), Pool(HOST, port, concurrency)
    rng = random.Random(1)
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            await one(pool, make_body(rng), headers, tally, time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    pool.close()
    return tally, elapsed


async def open_loop(port: int, rate: float, seconds: float, headers: dict[str, str], max_conns: int
                    ) -> tuple[Tally, float, int]:
    tally, pool = Tally(), Pool(HOST, port, max_conns)
    rng = random.Random(2)
    n = int(rate * seconds)
    started = tally.started = time.monotonic()  # type: ignore[attr-defined]
    tasks = set()
    for i in range(n):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(pool, make_body(rng), headers, tally, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    send_s = time.monotonic() - started
    if tasks:
        await asyncio.wait(tasks, timeout=90)
    pool.close()
    return tally, send_s, n


def p50_p99_ms(samples: list[float], digits: int) -> str:
    """"p50 / p99 ms" of latencies in seconds ("nan / nan ms" when there are none)."""
    p50, p99 = percentiles(samples, (50, 99), float("nan"))
    return f"{p50 * 1e3:.{digits}f} / {p99 * 1e3:.{digits}f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="overload phase length (default 30)")
    p.add_argument("--factor", type=float, default=10.0, help="offered rate / saturated rate (default 10)")
    p.add_argument("--sat-seconds", type=float, default=8.0, help="saturation phase length (default 8)")
    p.add_argument("--concurrency", type=int, default=256, help="closed-loop clients for saturation (no client deadline)")
    p.add_argument("--max-conns", type=int, default=1024, help="client connection cap in the open loop")
    p.add_argument("--timeout", type=float, default=2.0, help="x-request-timeout each client sends (s)")
    p.add_argument("--server-timeout", type=float, default=30.0, help="server.request_timeout_s")
    p.add_argument("--max-queue", type=int, default=4096, help="batching.max_queue")
    p.add_argument("--fake-batch-ms", type=float, default=40.0, help="fake backend: cost per batch (ms)")
    p.add_argument("--fake-token-us", type=float, default=500.0, help="fake backend: cost per padded token (us)")
    p.add_argument("--real", action="store_true", help="serve the real model (CPU) instead of the fake backend")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    assert 0 < args.seconds <= 300 and 0 < args.factor <= 50 and args.max_conns <= 4096, "bounded runs only"

    headers = {"Content-Type": "application/json", "x-request-timeout": str(args.timeout)}
    server = start_server(args)
    port = server.port
    try:
        # warm up (and let the cost model learn), then measure
        asyncio.run(closed_loop(port, 16, 1.0, headers))
        rss0 = server.rss_mb()["rss_mb"]
        sat_headers = {**headers, "x-request-timeout": str(args.server_timeout)}  # saturate: never refuse
        sat, sat_s = asyncio.run(closed_loop(port, args.concurrency, args.sat_seconds, sat_headers))
        sat_rate = sat.status[200] / sat_s
        rss1 = server.rss_mb()["rss_mb"]
        stats_before = json.loads(asyncio.run(get(port, "/stats"))[1])
        rate = sat_rate * args.factor
        over, send_s, offered = asyncio.run(open_loop(port, rate, args.seconds, headers, args.max_conns))
        rss2 = server.rss_mb()["rss_mb"]
        stats_after = json.loads(asyncio.run(get(port, "/stats"))[1])
        health = asyncio.run(get(port, "/health"))[0]
    finally:
        rc = server.stop()
        log_text = server.log_text()
        server.close()
    log_errors = sum(1 for line in log_text.splitlines() if " ERROR " in line)
    sent = offered - over.skipped
    accepted = over.status[200]
    # 200s per second from the first arrival to the last 200 (the queue's tail drains after the offer ends)
    ok_rate = accepted / max(over.last_ok - over.started, args.seconds)  # type: ignore[attr-defined]
    n429 = over.status[429]
    d_out = {k: stats_after["outcomes"][k] - stats_before["outcomes"][k] for k in stats_after["outcomes"]}
    d_rej = {k: v - stats_before["rejections"].get(k, 0) for k, v in stats_after["rejections"].items()}
    mode = "real model (CPU)" if args.real else f"fake backend ({args.fake_batch_ms} ms/batch + {args.fake_token_us} us/token)"
    rows = [
        ("backend", mode),
        ("client deadline (x-request-timeout)", f"{args.timeout:.1f} s"),
        ("saturated throughput (closed loop, %d clients)" % args.concurrency, f"{sat_rate:.1f} req/s"),
        ("  p50 / p99 latency at saturation", p50_p99_ms(sat.latency_ok, 0)),
        ("offered rate (overload)", f"{rate:.1f} req/s = {args.factor:g}x for {args.seconds:g} s"),
        ("  requests offered / sent / not sent (client cap)", f"{offered} / {sent} / {over.skipped}"),
        ("  achieved send rate", f"{offered / send_s:.1f} req/s"),
        ("accepted throughput (200s)", f"{ok_rate:.1f} req/s = {ok_rate / sat_rate:.0%} of saturated"),
        ("share of 429 (of sent)", f"{n429 / max(sent, 1):.1%}  {dict(over.reasons)}"),
        ("  429 latency p50 / p99", p50_p99_ms(over.latency_429, 1)),
        ("  Retry-After min / median / max", f"{min(over.retry_after, default=0)} / {int(percentiles(over.retry_after, (50,), 0)[0])} / {max(over.retry_after, default=0)} s"),
        ("accepted latency p50 / p99", p50_p99_ms(over.latency_ok, 0)),
        ("other statuses / transport errors", f"{ {k: v for k, v in over.status.items() if k not in (200, 429)} } / {dict(over.errors)}"),
        ("server RSS warm / after saturation / after overload", f"{rss0:.1f} / {rss1:.1f} / {rss2:.1f} MiB"),
        ("server outcomes during overload (/stats)", str(d_out)),
        ("server rejections during overload (/stats)", str(d_rej)),
        ("health after overload / exit code on SIGTERM", f"{health} / {rc}"),
        ("ERROR lines in the server log", str(log_errors)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nbatchd overload run (127.0.0.1)")
    print("-" * (width + 50))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 50))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
