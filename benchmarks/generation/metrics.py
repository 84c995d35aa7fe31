"""Per-request timing records and their summary, shared by the offline baselines and the HTTP client.

A record (one request, times in seconds on one perf_counter clock, relative to the phase start):
  arrival  - when the request arrived (closed loop: 0 for all; open loop: its *scheduled* Poisson
             arrival, so a slow system cannot hide queueing)
  times    - when each of its generated tokens became available (offline) / each content chunk was
             received (HTTP); TTFT = times[0] - arrival, ITL = the gaps between consecutive times
  tokens   - generated tokens that were the request's own (static batches: not the padding steps
             past its max_tokens); HTTP: usage.completion_tokens
"""
from __future__ import annotations

import numpy as np


def record(i: int, arrival: float, times: list[float], tokens: int, **extra) -> dict:
    return {"i": i, "arrival": round(arrival, 6), "times": [round(t, 6) for t in times], "tokens": tokens, **extra}


def _pct(values, qs=(50, 99)) -> list[float | None]:
    if len(values) == 0:
        return [None] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]


def summarise(records: list[dict], wall_s: float | None = None) -> dict:
    """tokens/s over the phase (first arrival .. last token), TTFT and ITL percentiles in ms.
    ITL pools every gap of every request (as vLLM's benchmark does); TPOT is per request
    (last - first) / (n - 1), its p50 over requests."""
    ok = [r for r in records if r.get("times") and not r.get("error")]
    errors = len(records) - len(ok)
    if not ok:
        return {"requests": len(records), "ok": 0, "errors": errors, "tokens": 0, "tokens_s": None}
    start = min(r["arrival"] for r in records)
    end = max(r["times"][-1] for r in ok)
    wall = wall_s if wall_s is not None else end - start
    ttft = [(r["times"][0] - r["arrival"]) * 1e3 for r in ok]
    itl = np.concatenate([np.diff(r["times"]) for r in ok if len(r["times"]) > 1] or [np.zeros(0)]) * 1e3
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) * 1e3 for r in ok if len(r["times"]) > 1]
    e2e = [(r["times"][-1] - r["arrival"]) * 1e3 for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    t50, t99 = _pct(ttft)
    i50, i99 = _pct(itl)
    e50, e99 = _pct(e2e)
    return {"requests": len(records), "ok": len(ok), "errors": errors, "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_s": tokens / wall if wall > 0 else None,
            "req_s": len(ok) / wall if wall > 0 else None,
            "ttft_p50_ms": t50, "ttft_p99_ms": t99, "ttft_mean_ms": float(np.mean(ttft)),
            "itl_p50_ms": i50, "itl_p99_ms": i99, "itl_max_ms": float(itl.max()) if len(itl) else None,
            "tpot_p50_ms": _pct(tpot)[0], "e2e_p50_ms": e50, "e2e_p99_ms": e99}


def poisson_arrivals(n: int, rate: float, seed: int, max_s: float) -> list[float]:
    """Up to n arrival times (s from the phase start) of a Poisson process at `rate`/s, none after max_s."""
    import random

    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        if t > max_s:
            break
        out.append(t)
    return out
