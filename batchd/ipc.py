"""What crosses between a front-end process and the engine process (`server.workers > 1`).

Messages are msgspec Structs encoded as MessagePack (array-like, tagged), in length-prefixed frames
(4 bytes little-endian, then the payload) over one Unix stream socket per front end. Token ids and
vectors travel as raw little-endian numpy buffers, never as lists of numbers. Writes are coalesced:
every frame sent during one event-loop iteration goes out in one `write` (one syscall).

front end -> engine: Embed, Generate, Cancel, Reject, Counts, Query
engine -> front end: Hello, State, Vectors, Delta, Failed, Reply, Drained
"""
from __future__ import annotations

import asyncio
import logging
import struct
from typing import Callable, Union

import msgspec
import numpy as np

from . import errors

log = logging.getLogger("batchd.ipc")
_LEN = struct.Struct("<I")
MAX_FRAME = 256 << 20


class _Msg(msgspec.Struct, tag=True, array_like=True):
    pass


# ---- front end -> engine ----------------------------------------------------------------------
class Embed(_Msg):
    rid: int
    model: str
    ids: bytes  # int64 token ids of every input, concatenated
    lengths: bytes  # int64 length of each input
    deadline: float  # time.monotonic() (CLOCK_MONOTONIC: one clock for every process of the host)
    tokenize_s: float


class Generate(_Msg):
    rid: int
    model: str
    prompt: bytes  # int64 token ids
    max_tokens: int
    max_tokens_asked: int | None
    min_tokens: int
    ignore_eos: bool
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None
    deadline: float
    tokenize_s: float


class Cancel(_Msg):
    """The client went away (or the handler gave up): the engine drops the request's inputs."""
    rid: int


class Reject(_Msg):
    """A request refused in the front end before the engine saw it (bad input...), for /stats."""
    model: str
    reason: str


class Counts(_Msg):
    """Counter increments recorded in the front end (HTTP responses by status), flushed in batches."""
    items: list[tuple[str, str, str, float]]  # (model, metric, label, amount)


class Query(_Msg):
    rid: int
    what: str  # "stats" | "reset" | "metrics"


# ---- engine -> front end ----------------------------------------------------------------------
class State(_Msg):
    states: dict[str, tuple[str, str | None]]  # model -> (state, failure)


class Vectors(_Msg):
    rid: int
    data: bytes  # float32 [n, dim]
    dim: int
    queue_s: list[float]
    inference_s: list[float]
    batch_size: list[int]
    padding: list[float]


class Delta(_Msg):
    rid: int
    text: str
    finish: str | None
    generated: int


class Failed(_Msg):
    rid: int
    error: str  # the BatchdError class name
    message: str
    param: str | None
    code: str | None
    headers: dict[str, str]


class Reply(_Msg):
    rid: int
    body: bytes


class Drained(_Msg):
    """The engine has answered every accepted request: front ends stop serving and exit."""


Message = Union[Embed, Generate, Cancel, Reject, Counts, Query, State, Vectors, Delta, Failed, Reply, Drained]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def failed(rid: int, exc: errors.BatchdError) -> Failed:
    return Failed(rid, type(exc).__name__, exc.message, exc.param, exc.code, exc.headers)


def error_of(msg: Failed) -> errors.BatchdError:
    """The exception the engine raised, rebuilt on this side (same class, status, code, headers)."""
    cls = getattr(errors, msg.error, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.BatchdError)):
        cls = errors.BatchdError
    return cls(msg.message, param=msg.param, code=msg.code, headers=msg.headers)


def pack_ids(rows: list[np.ndarray]) -> tuple[bytes, bytes]:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = rows[0] if len(rows) == 1 else np.concatenate(rows)
    return np.ascontiguousarray(ids, dtype=np.int64).tobytes(), lengths.tobytes()


def unpack_ids(ids: bytes, lengths: bytes) -> list[np.ndarray]:
    flat = np.frombuffer(ids, dtype=np.int64)
    sizes = np.frombuffer(lengths, dtype=np.int64)
    if len(sizes) == 1:
        return [flat]
    return np.split(flat, np.cumsum(sizes)[:-1])


class Channel(asyncio.Protocol):
    """One end of a connection: `send(msg)` queues a frame (flushed once per loop iteration),
    `on_message(msg)` is called for every frame received, `on_lost()` once when the peer is gone."""

    def __init__(self, on_message: Callable[[object], None], on_lost: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self.on_connect: Callable[[], None] | None = None
        self.connected = asyncio.get_event_loop().create_future()

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.on_connect is not None:
            self.on_connect()
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > MAX_FRAME:
                log.error("frame of %d bytes: closing the channel", size)
                self.close()
                return
            if end - pos - 4 < size:
                break
            msg = _decoder.decode(memoryview(buf)[pos + 4:pos + 4 + size])
            pos += 4 + size
            try:
                self.on_message(msg)
            except Exception:
                log.exception("handling %s failed", type(msg).__name__)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.on_lost()

    # ---- sending -----------------------------------------------------------------------------------
    def send(self, msg: object) -> None:
        if self.closed or self.transport is None:
            return
        payload = _encoder.encode(msg)
        self._out.append(_LEN.pack(len(payload)))
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()
