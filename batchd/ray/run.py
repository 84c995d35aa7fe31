"""`batchd ray --config config.toml --replicas N [--address ADDR]`: deploy batchd on Ray Serve and
serve on the config's host:port through Ray's proxy until SIGTERM/SIGINT.

Without --address it starts a local Ray cluster (this machine) and stops all of it on exit; with
--address it joins a running cluster, and on exit deletes only its own application (and Serve
itself only when it started Serve and nothing else is deployed there).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import ray
from ray import serve

from ..config import Config
from .deployment import APP_NAME, build_app, deployment_options
from .proxy import CLUSTER_ENV

log = logging.getLogger("batchd.ray")
SERVE_NAMESPACE = "serve"
SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"


def run(config: Config, replicas: int | None = None, address: str | None = None) -> int:
    began = time.monotonic()
    if address is None:
        # Ray's proxies read these from the environment the cluster starts with, which is ours here
        # (on a cluster started elsewhere, `ray start` must be given them: see README).
        for key, value in CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(include_dashboard=False, _metrics_export_port=config.ray.metrics_export_port or None)
    else:
        ray.init(address=address)
    stop = threading.Event()
    starting = True

    def on_signal(*_: object) -> None:
        stop.set()
        if starting:  # interrupt a deployment that is still starting (or cannot be placed)
            raise _Stopped

    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, on_signal)
    cluster_s = time.monotonic() - began
    serve_was_running = _serve_running()
    try:
        serve.start(proxy_location=config.ray.proxy_location, http_options={
            "host": config.server.host, "port": config.server.port,
            # the proxy's own bound on a request: batchd answers by its deadline; this catches a
            # replica that cannot (stuck), a little later, so batchd's own 504 wins when it can
            "request_timeout_s": config.server.request_timeout_s + 5,
            "keep_alive_timeout_s": 75})
        options = deployment_options(config, replicas)
        serve.run(build_app(config, replicas), name=APP_NAME, route_prefix="/")
        starting = False
        log.info("batchd serving on http://%s:%d through Ray Serve: %s replicas, max_ongoing_requests=%d "
                 "(Ray cluster %.1f s, deployment ready %.1f s)", config.server.host, config.server.port,
                 options.get("num_replicas", options.get("autoscaling_config")),
                 options["max_ongoing_requests"], cluster_s, time.monotonic() - began - cluster_s)
        while not stop.wait(0.5):
            pass
    except _Stopped:
        pass
    finally:
        starting = False
        log.info("stopping the deployment (replicas drain for up to %.0f s)", config.server.drain_timeout_s)
        _stop(address is None, serve_was_running)
    return 0


class _Stopped(Exception):
    """SIGTERM/SIGINT before the deployment was ready."""


def _serve_running() -> bool:
    try:
        ray.get_actor(SERVE_CONTROLLER, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _stop(own_cluster: bool, serve_was_running: bool) -> None:
    try:
        if own_cluster or (not serve_was_running and set(serve.status().applications) <= {APP_NAME}):
            serve.shutdown()  # every application drains, then Serve's controller and proxies stop
        else:
            serve.delete(APP_NAME)  # drains our replicas; the cluster's Serve keeps serving the rest
    finally:
        ray.shutdown()  # on a cluster we started, this stops all of its processes
