"""A middleware for Ray Serve's HTTP proxy: a request whose replica died before answering is sent
again (Ray routes it to a live replica), or answered with a clean 503.

Without it, a client whose replica is killed mid-request gets a bare 500 "Internal Server Error"
from the proxy's HTTP server: Ray's proxy sends nothing when the replica actor dies. batchd's
requests can be replayed safely: an embedding (or a non-streamed completion) has no side effect, and
an attempt that sent no response body gave the client nothing. A response whose body has begun is
never retried.

The buffered body also travels to the replica inside the request's scope (BODY_KEY), where
BodyFromScope hands it to batchd: the replica then never calls back into the proxy for the body.
That saves a round trip per request, and it closes a gap in Ray: a request that Ray re-routes after
its first replica died, when that replica had already fetched the body from the proxy, would wait
for a body that never comes.

Ray configures its proxies from the environment the cluster was started with (CLUSTER_ENV below;
`batchd ray` sets it on the clusters it starts, `ray start` needs it given). Imports nothing heavy:
this module runs in Ray's proxy.
"""
from __future__ import annotations

import asyncio
import json

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CALLBACK = "batchd.ray.proxy:middlewares"
CLUSTER_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,  # Ray's proxies load middlewares() below
    # Ray's proxy sends a request to a replica on its own node (then zone) while that one accepts it.
    # A batchd replica accepts up to its queue bound, so with one proxy (proxy_location HeadOnly)
    # the other nodes' replicas would idle; without the preference the proxy sends each request to
    # the less busy of two replicas, wherever they run.
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0",
}
ATTEMPTS = 3  # the first try and two more: a dead replica is dropped from routing at once
MAX_REPLAY_BYTES = 8 << 20  # larger bodies are streamed through once, never buffered for a retry
BODY_KEY = "batchd.body"  # the buffered request body, in the ASGI scope Ray sends to the replica


def middlewares() -> list[Middleware]:
    """The callback Ray calls when each proxy starts."""
    return [Middleware(RetryLostReplica)]


class RetryLostReplica:
    def __init__(self, app: ASGIApp, attempts: int = ATTEMPTS, backoff_s: float = 0.05) -> None:
        self.app = app
        self.attempts = attempts
        self.backoff_s = backoff_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive, MAX_REPLAY_BYTES)
        if not complete:  # too big to keep a copy: one attempt, the rest streamed from the client
            await self.app(scope, _replay(body, receive), send)
            return
        held: Message | None = None  # the response's start, sent only once its body comes too
        committed = False  # the client has been sent something: no retry from here on
        disconnected = False

        async def holding_send(message: Message) -> None:
            # Ray streams a response's start and body from the replica as separate messages: a
            # replica that dies between the two must not leave the client with headers and no body.
            nonlocal held, committed
            if message["type"] == "http.response.start":
                held = message
                return
            if held is not None:
                await send(held)
                held, committed = None, True
            await send(message)

        async def tracking_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        whole = b"".join(m.get("body", b"") for m in body if m["type"] == "http.request")
        for attempt in range(self.attempts):
            held = None
            # a fresh scope each time: the proxy keys its per-request state by what it puts there
            await self.app({**scope, BODY_KEY: whole}, _replay(body, tracking_receive), holding_send)
            if committed or disconnected:
                return
            await asyncio.sleep(self.backoff_s * (attempt + 1))
        await _send_unavailable(send)


class BodyFromScope:
    """Replica side: the body RetryLostReplica put in the scope is the request's body, handed over
    at once. After it, receive() waits until Ray cancels the request, which Ray does when the client
    leaves: batchd's disconnect watch then costs nothing, where each of its receive() calls through
    Ray is a call back into the proxy (measured: the proxy's CPU per request doubles under load)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = scope.get(BODY_KEY) if scope["type"] == "http" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        given = False

        async def receive_from_scope() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.get_running_loop().create_future()  # cancelled with the request
            raise AssertionError("unreachable")

        await self.app(scope, receive_from_scope, send)


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The request's body messages, up to `limit` bytes; False when more remain unread."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # a disconnect: replay it, the app will see it
            return messages, True
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, True
        if size > limit:
            return messages, False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out the buffered body again, then whatever the client sends next
    (more body, or http.disconnect while the request waits)."""
    queue = list(messages)

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


async def _send_unavailable(send: Send) -> None:
    body = json.dumps({"error": {
        "message": "the replica serving this request stopped, and no other replica could take it; retry",
        "type": "server_error", "param": None, "code": "replica_unavailable"}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
