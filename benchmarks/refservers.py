"""Reference servers (run as `python -m benchmarks.refservers bare|trivial FD`).

bare:    Starlette + Hypercorn, one route that reads and msgspec-decodes the body and answers with
         orjson the same JSON shape batchd returns for one input with the fake backend (dim 32).
         batchd (fake, 0 ms) / bare = what the scheduler, queue and model thread cost per request.
trivial: asyncio Protocol that answers every request with canned bytes, no framework at all. The load
         generator against it shows the client's own ceiling (it cannot go faster than this).
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sys


def _vector():
    import numpy as np

    v = np.cos(np.arange(1, 33, dtype=np.float64) * 0.37)
    return (v / np.linalg.norm(v)).astype(np.float32)


def run_bare(fd: int) -> None:
    import msgspec
    import orjson
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    vector = _vector()
    decoder = msgspec.json.Decoder()

    async def embeddings(request):
        req = decoder.decode(await request.body())
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(texts))]
        payload = {"object": "list", "data": data, "model": "fake",
                   "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def health(request):
        return Response(b'{"status":"ready"}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]),
                            Route("/health", health)])
    hc = Config()
    hc.bind = [f"fd://{fd}"]
    hc.accesslog = None
    hc.keep_alive_timeout = 75  # as batchd's server.py
    asyncio.run(_serve_until_term(lambda stop: serve(app, hc, shutdown_trigger=stop.wait)))


async def _serve_until_term(start) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await start(stop)


class _Canned(asyncio.Protocol):
    body = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0]}],"model":"trivial"}'
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        # answer each complete request (headers + content-length body) in the buffer
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            self.transport.write(self.response)


def run_trivial(fd: int) -> None:
    async def main(stop: asyncio.Event) -> None:
        sock = socket.socket(fileno=fd)
        server = await asyncio.get_running_loop().create_server(_Canned, sock=sock, backlog=4096)
        async with server:
            await stop.wait()

    asyncio.run(_serve_until_term(main))


if __name__ == "__main__":
    {"bare": run_bare, "trivial": run_trivial}[sys.argv[1]](int(sys.argv[2]))
