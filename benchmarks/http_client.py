"""The benchmarks' HTTP/1.1 client: keep-alive connections over raw asyncio streams, a pool of them,
and latency percentiles. One implementation for the load generator (loadgen.py: requests pre-encoded
to bytes once, sent with `Conn.call`) and the overload run (overload.py: requests built per call with
their own method, path and headers, sent with `Conn.request`).

Why not httpx: it tops out near 1k requests/s per core, which would make the client the bottleneck.
A response is read as its head + Content-Length bytes (no chunked bodies); `call` parses only the
status and whether the server closes the connection, `request` parses the headers too.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

# What one request can fail with on the wire; a response without Content-Length is a ValueError.
TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError)


def request_head(method: str, host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    """A request's line and headers, all but Content-Length (`with_body` adds it and ends the head)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}".encode()


def with_body(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def parse_headers(head: bytes) -> dict[str, str]:
    """A response head's headers, names lower-cased (the status line is skipped)."""
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return out


class Conn:
    """One keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        self.reader, self.writer = reader, writer
        self.host, self.port = host, port
        self.head = b""  # the last response's head

    async def call(self, raw: bytes) -> tuple[int, bytes, bool]:
        """Send a pre-encoded request; (status, body, whether the server closes the connection after
        this response). The load generator's hot path: keep it lean."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"content-length:")
        if i < 0:
            raise ValueError("response without content-length")
        j = lower.find(b"\r\n", i)
        body = await self.reader.readexactly(int(head[i + 15:j]))
        self.head = head
        return status, body, b"connection: close" in lower

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        """Build and send one request; (status, response headers with lower-case names, body)."""
        status, payload, _ = await self.call(with_body(request_head(method, self.host, self.port, path,
                                                                    headers or {}), body))
        return status, parse_headers(self.head), payload

    def close(self) -> None:
        self.writer.close()


async def connect(host: str, port: int) -> Conn:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    return Conn(reader, writer, host, port)


class Pool:
    """Idle keep-alive connections for reuse, new ones opened on demand, at most `limit` open at once."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[Conn] = []
        self.open = 0  # open now, idle or in use
        self.opened = 0  # opened in all

    def get(self) -> Conn | None:
        """An idle connection if there is one (no await: the load generator's hot path)."""
        return self.idle.pop() if self.idle else None

    async def take(self) -> Conn | None:
        """An idle connection, else a new one; None when `limit` are open and none is idle."""
        if self.idle:
            return self.idle.pop()
        if self.open >= self.limit:
            return None
        self.open += 1
        conn = None
        try:
            conn = await connect(self.host, self.port)
        finally:
            if conn is None:  # the connect failed: that place is free again
                self.open -= 1
        self.opened += 1
        return conn

    def give(self, conn: Conn, reuse: bool) -> None:
        """Back after a request: kept for the next one, or (broken, or closed by the server) closed."""
        if reuse:
            self.idle.append(conn)
        else:
            self.open -= 1
            conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def percentiles(samples: Sequence[float] | np.ndarray, qs: Sequence[float], empty: float | None = None
                ) -> list[float | None]:
    """The qs-th percentiles of samples (numpy's linear interpolation); `empty` for each when there
    are no samples."""
    if len(samples) == 0:
        return [empty] * len(qs)
    return np.percentile(samples, qs).tolist()
