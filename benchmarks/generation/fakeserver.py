"""A stand-in for batchd's generation routes (`python -m benchmarks.generation.fakeserver FD [TTFT_MS ITL_MS]`).

Starlette + Hypercorn (as batchd), one streaming `POST /v1/chat/completions` that answers every
request with `max_tokens` words after TTFT_MS, one every ITL_MS, in exactly the OpenAI stream
format: a role chunk (`delta: {"role": "assistant", "content": ""}`), one chunk per token, a chunk
with `finish_reason: "length"` and an empty delta, a usage chunk with `choices: []` when
`stream_options.include_usage` is set, then `data: [DONE]`. No model: requests do not slow each
other down. Used by the self-test (does the client measure TTFT/ITL right, and how many chunks/s
can it read: its own ceiling) and as an executable statement of the contract the client expects.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time


def app(ttft_ms: float, itl_ms: float):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def chat(request):
        req = json.loads(await request.body())
        n = int(req.get("max_tokens") or 16)
        model = req.get("model", "fake")
        created = int(time.time())
        cid = f"chatcmpl-fake{id(req):x}"
        prompt_tokens = sum(len(m.get("content", "").split()) for m in req.get("messages", []))

        def chunk(delta: dict, finish=None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        if not req.get("stream"):
            text = " ".join(f"w{k}" for k in range(n))
            await asyncio.sleep((ttft_ms + itl_ms * (n - 1)) / 1e3)
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                           "total_tokens": prompt_tokens + n}})

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            start = time.perf_counter()
            for k in range(n):
                due = start + (ttft_ms + itl_ms * k) / 1e3
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield chunk({"content": f"w{k} " if k < n - 1 else f"w{k}"})
            yield chunk({}, "length")
            if (req.get("stream_options") or {}).get("include_usage"):
                usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                  "total_tokens": prompt_tokens + n}}
                yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request):
        return Response(b'{"status":"ready"}', media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


def main() -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from ..refservers import _serve_until_term

    fd = int(sys.argv[1])
    ttft_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 50.0
    itl_ms = float(sys.argv[3]) if len(sys.argv) > 3 else 20.0
    hc = Config()
    hc.bind = [f"fd://{fd}"]
    hc.accesslog = None
    asyncio.run(_serve_until_term(lambda stop: serve(app(ttft_ms, itl_ms), hc, shutdown_trigger=stop.wait)))


if __name__ == "__main__":
    main()
