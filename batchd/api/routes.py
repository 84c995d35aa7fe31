"""What every handler shares (auth, body, JSON decoding, deadline, disconnects, JSON answers) and
the operations routes (/v1/models, /health, /stats, /metrics)."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Awaitable, Callable, TypeVar

import msgspec
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..config import ServerConfig
from ..errors import (ClientDisconnected, InvalidRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType)
from .models import ServedModels

log = logging.getLogger("batchd.api")
T = TypeVar("T")


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class RawEndpoint:
    """Marks `async def f(scope, receive, send)` as an ASGI app for Starlette's Route, which would wrap
    a plain function as `Request -> Response`. Returns f's coroutine: no extra layer per request."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.fn = fn

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self.fn(scope, receive, send)


async def send_json(send: Send, payload: object, headers: list[tuple[bytes, bytes]], status: int = 200) -> None:
    """Answer a raw ASGI route: the same bytes json_response sends, without a Response object."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})


def served(request: Request) -> ServedModels:
    return request.app.state.models


def check_api_key(request: Request) -> None:
    _check_key(request.app.state.api_key, request.headers.get("authorization", ""))


def _check_key(key: str | None, given: str) -> None:
    if key and not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def read_json_request(request: Request, decoder: msgspec.json.Decoder) -> tuple[object, float, float]:
    return await read_json(request.scope, request.receive, decoder)


async def read_json(scope: Scope, receive: Receive, decoder: msgspec.json.Decoder) -> tuple[object, float, float]:
    """Auth, content type, deadline and body checks every POST route makes, then the decoded body.
    Returns (body, received at, deadline), both on time.monotonic(). Reads the raw ASGI headers in
    one pass: a Starlette Headers lookup scans and encodes on every call."""
    ctype = length = timeout = None
    auth = ""
    for name, value in scope["headers"]:  # ASGI header names are lowercase
        if name == b"content-type":
            ctype = value.decode("latin-1")
        elif name == b"content-length":
            length = value
        elif name == b"authorization":
            auth = value.decode("latin-1")
        elif name == b"x-request-timeout":
            timeout = value.decode("latin-1")
    state = scope["app"].state
    _check_key(state.api_key, auth)
    if ctype is not None:
        ctype = ctype.split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType(f"content type {ctype!r} is not supported: send application/json")
    cfg: ServerConfig = state.config.server
    received = time.monotonic()
    deadline = received + request_timeout(timeout, cfg.request_timeout_s)
    return decode_request(await read_body(receive, length, cfg.max_body_bytes), decoder), received, deadline


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` (never read whole)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared.decode()} bytes, over the limit of {limit}")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # gone before sending its whole body: a 499, not a 500
            raise ClientDisconnected("client disconnected while sending the request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def decode_request(body: bytes, decoder: msgspec.json.Decoder):
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = text.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in text else None
        if param is None and "missing required field `" in text:
            param = text.rsplit("missing required field `", 1)[1].split("`", 1)[0]
        raise InvalidRequest(f"invalid request body: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # msgspec refuses very deep nesting this way; a client error, not a 500
        raise InvalidRequest("request body is nested too deeply", code="invalid_json") from None


def request_timeout(header: str | None, default: float) -> float:
    """The x-request-timeout header's deadline, or the server's."""
    if header is None:
        return default
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidRequest("x-request-timeout must be a positive number of seconds", param="x-request-timeout")
    return min(value, default)  # a client may shorten its deadline, not lengthen it


class DisconnectWatch:
    """`future` resolves when the client goes away (the server sends http.disconnect). Watching
    costs a task per request (~20 us to start and cancel), so it starts only once a request has
    waited WATCH_AFTER_S: most embedding answers come sooner (at 256 clients in flight, p50 ~150 ms)
    and need no watch; a client that leaves a slow one (a long queue, a generation) is still
    noticed while queued or running, and one that leaves sooner costs at most that much model time."""

    WATCH_AFTER_S = 0.25

    def __init__(self, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        self._receive = receive
        self.future: asyncio.Future[None] = loop.create_future()
        self._task: asyncio.Task | None = None
        self._timer = loop.call_later(self.WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.future.done():
            self.future.set_result(None)

    def close(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            # dropped as well as cancelled: the task's CancelledError keeps the _watch frame (and so
            # this object) alive, and a reference back to the task would make a cycle that only the
            # garbage collector frees; at thousands of requests a second those collections cost more
            # than the rest of the request
            self._task.cancel()
            self._task = None


# ---- operations routes ---------------------------------------------------------------------------
async def models(request: Request) -> Response:
    check_api_key(request)
    created = int(time.time() - (time.monotonic() - request.app.state.started))
    return json_response({"object": "list", "data": [
        {"id": e.name, "object": "model", "created": created, "owned_by": "batchd", "task": e.kind}
        for e in served(request).engines]})


async def health(request: Request) -> Response:
    models = served(request)
    state = models.state
    body: dict = {"status": state}
    failures = {e.name: e.failure for e in models.engines if e.failure}
    if failures:
        body["failure"] = next(iter(failures.values())) if len(models.engines) == 1 else failures
    if len(models.engines) > 1:
        body["models"] = {e.name: e.state for e in models.engines}
    return json_response(body, status=200 if state == "ready" else 503)


async def stats(request: Request) -> Response:
    """The figures of this server (or, under Ray, of this replica: `scope` says which), with the
    instance that answered."""
    check_api_key(request)
    state = request.app.state
    body = await served(request).stats_body()
    head = orjson.dumps({"scope": state.stats_scope, "instance": state.instance})
    return Response(head[:-1] + b"," + body[1:], media_type="application/json")


async def stats_reset(request: Request) -> Response:
    check_api_key(request)
    await served(request).reset_stats()
    return json_response({"reset": True})


async def metrics(request: Request) -> Response:
    return Response(await served(request).metrics_body(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
