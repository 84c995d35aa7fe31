"""Streaming chat client for batchd (`python -m benchmarks.generation.client SPEC.json`, its own process).

Each request is `POST /v1/chat/completions` with `stream: true` and
`stream_options: {"include_usage": true}`, read as server-sent events (`data: {json}` lines, then
`data: [DONE]`). Per request it records, on one perf_counter clock relative to the phase start:

  times   - when each chunk carrying non-empty `delta.content` arrived (TTFT = times[0] - arrival,
            ITL = gaps between them; a server that puts several tokens in one chunk shows larger
            gaps and fewer chunks than tokens: `chunks` vs `tokens` is recorded)
  tokens  - usage.completion_tokens from the usage chunk (falls back to the number of content chunks)
  text    - the concatenated content (compared with generate()'s greedy text)
  contract- what deviates from the OpenAI stream format (wrong object, no finish_reason, no usage
            chunk, no [DONE], content after the finish chunk, completion_tokens != max_tokens...)

Before the clock starts the client opens its keep-alive connections (GET /health), as a long-lived
client would have them. Modes: closed loop (every request sent at t=0) or open loop (each sent at its Poisson arrival
time, TTFT counted from that scheduled time). Bounded: nothing is sent after `max_s`, and whatever
has not finished `max_s + drain_s` after the start is cancelled and counted as a timeout.

Output (stdout, one JSON line): {"records": [...], "client_cpu": share of one core, "wall_s": ...}.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import httpx

CHUNK_OBJECT = "chat.completion.chunk"


async def one(client: httpx.AsyncClient, path: str, body: bytes, max_tokens: int, i: int, arrival: float,
              t0: float, headers: dict) -> dict:
    """One streamed request; never raises (errors are recorded)."""
    rec: dict = {"i": i, "arrival": round(arrival, 6), "times": [], "tokens": 0, "chunks": 0}
    times: list[float] = rec["times"]
    parts: list[str] = []
    contract: list[str] = []
    usage = None
    finish = None
    done = False
    ids: set[str] = set()
    sent = time.perf_counter()
    rec["sent"] = round(sent - t0, 6)
    try:
        async with client.stream("POST", path, content=body, headers=headers) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return rec
            ctype = resp.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                contract.append(f"content-type {ctype!r}")
            async for line in resp.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data:"):
                    if not line.startswith(":"):  # SSE comments are allowed
                        contract.append(f"non-data line {line[:40]!r}")
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                now = time.perf_counter()
                if done:
                    contract.append("data after [DONE]")
                obj = json.loads(data)
                if "error" in obj and "choices" not in obj:
                    rec["error"] = f"stream error: {json.dumps(obj)[:300]}"
                    break
                if obj.get("object") != CHUNK_OBJECT:
                    contract.append(f"object {obj.get('object')!r}")
                ids.add(obj.get("id"))
                if obj.get("usage"):
                    usage = obj["usage"]
                    if obj.get("choices"):
                        contract.append("usage chunk has choices (OpenAI sends choices: [])")
                for ch in obj.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        if finish is not None:
                            contract.append("content after finish_reason")
                        times.append(now - t0)
                        parts.append(content)
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
                rec["chunks"] += 1
    except (httpx.HTTPError, OSError, ValueError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    except asyncio.CancelledError:
        rec["error"] = "timeout (cancelled at the phase bound)"
    rec["text"] = "".join(parts)
    rec["finish_reason"] = finish
    rec["usage"] = usage
    rec["content_chunks"] = len(times)
    if not rec.get("error"):
        if not done:
            contract.append("no data: [DONE]")
        if finish is None:
            contract.append("no finish_reason")
        if usage is None:
            contract.append("no usage chunk (stream_options.include_usage)")
        elif usage.get("completion_tokens") != max_tokens:
            contract.append(f"completion_tokens {usage.get('completion_tokens')} != max_tokens {max_tokens}")
        if finish not in (None, "length"):
            contract.append(f"finish_reason {finish!r} (ignore_eos + min_tokens should end on 'length')")
        if len(ids) > 1:
            contract.append("chunk ids differ within one stream")
    rec["tokens"] = (usage or {}).get("completion_tokens") or len(times)
    rec["prompt_tokens"] = (usage or {}).get("prompt_tokens")
    if contract:
        rec["contract"] = sorted(set(contract))
    if not times and not rec.get("error"):
        rec["error"] = "no content"
    return rec


async def warm_connections(client: httpx.AsyncClient, n: int) -> None:
    """Open up to n keep-alive connections before the clock starts (GET /health, concurrently), so
    TTFT measures the server, not TCP set-up in a burst of n connects. Best effort."""
    async def get() -> None:
        try:
            await client.get("/health")
        except httpx.HTTPError:
            pass

    await asyncio.gather(*(get() for _ in range(n)))


async def run(spec: dict) -> dict:
    """spec: url, path, requests [{i, body (dict), max_tokens}], arrivals (None = closed loop),
    max_s, drain_s, api_key."""
    reqs = spec["requests"]
    arrivals = spec.get("arrivals")
    if arrivals is None:
        arrivals = [0.0] * len(reqs)
    reqs = reqs[:len(arrivals)]
    bodies = [json.dumps(r["body"]).encode() for r in reqs]
    headers = {"content-type": "application/json"}
    if spec.get("api_key"):
        headers["authorization"] = f"Bearer {spec['api_key']}"
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    timeout = httpx.Timeout(spec.get("max_s", 600) + spec.get("drain_s", 60), connect=10.0)
    max_s, drain_s = spec.get("max_s", 600.0), spec.get("drain_s", 60.0)
    cpu0 = time.process_time()
    async with httpx.AsyncClient(base_url=spec["url"], limits=limits, timeout=timeout) as client:
        await warm_connections(client, min(len(reqs), spec.get("warm_connections", len(reqs))))
        t0 = time.perf_counter()
        tasks = []
        for r, body, at in zip(reqs, bodies, arrivals):
            if at > max_s:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, spec.get("path", "/v1/chat/completions"), body,
                                                 r["max_tokens"], r["i"], at, t0, headers)))
        left = max(1.0, t0 + max_s + drain_s - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=left)
        for t in pending:
            t.cancel()
        records = [await t for t in tasks]  # one() catches its own cancellation
        wall = time.perf_counter() - t0
    for r, at in zip(reqs[len(tasks):], arrivals[len(tasks):]):
        records.append({"i": r["i"], "arrival": at, "times": [], "tokens": 0, "error": "not sent: time bound"})
    return {"records": records, "wall_s": round(wall, 3),
            "client_cpu": round((time.process_time() - cpu0) / max(wall, 1e-9), 3)}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    sys.stdout.write(json.dumps(asyncio.run(run(spec))) + "\n")


if __name__ == "__main__":
    main()
