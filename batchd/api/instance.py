"""`x-batchd-instance` on every response: which process answered. Behind a load balancer or Ray
Serve's proxy a client (or a test) tells replicas apart by it.

Pure ASGI (no BaseHTTPMiddleware): it adds one header to `http.response.start`, so it costs next to
nothing on the hot path and never buffers a body.
"""
from __future__ import annotations

import os
import socket
import sys

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def default_instance_id() -> str:
    """A stable id of this serving process: the Ray Serve replica id inside a replica (the value of
    the `replica` label on its metrics), host:pid otherwise."""
    return ray_replica_id() or f"{socket.gethostname()}:{os.getpid()}"


def ray_replica_id() -> str | None:
    """The Ray Serve replica's id when this process is one, else None. Never imports Ray itself: a
    plain batchd must not need it or pay for it (a replica has imported it already)."""
    if "ray.serve" not in sys.modules:
        return None
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_tag  # replica_id.unique_id
    except RayServeException:  # Ray is imported here, but this process is no replica
        return None


class InstanceHeader:
    def __init__(self, app: ASGIApp, instance_id: str) -> None:
        self.app = app
        self.header = (b"x-batchd-instance", instance_id.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)
