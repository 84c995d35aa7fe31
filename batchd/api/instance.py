"""The id of this serving process, sent as `x-batchd-instance` on every response (batchd/api/app.py's
ResponseHooks): behind a load balancer or Ray Serve's proxy a client (or a test) tells replicas apart by it."""
from __future__ import annotations

import os
import socket
import sys


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
