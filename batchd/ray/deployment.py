"""The Ray Serve deployment: each replica is a whole batchd (its models, queues, schedulers and model
threads) serving the same Starlette app as ASGI behind Ray's proxy. batchd does the batching, so no
`@serve.batch`, and no Hypercorn inside a replica: Ray's proxy speaks HTTP and hands requests over.

Deployment options come from config.toml's [ray] section (RayConfig); what is left at 0 there is
derived from the models' batch sizes and queue bounds, so that Ray never holds back a request that
batchd would batch or queue.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from ray import serve
from ray.serve import Application

from ..api.app import create_app
from ..api.instance import default_instance_id
from ..config import Config, ConfigError, config_from_dict, load_config
from .metrics import RayMetrics
from .proxy import BodyFromScope

log = logging.getLogger("batchd.ray")

APP_NAME = "batchd"
STATS_SCOPE = "replica"  # /stats under Ray counts one replica's work, not the whole deployment's


def batch_capacity(config: Config) -> int:
    """Requests one replica batches at once: per model its largest batch (embed) or running
    sequences (generate), summed, since every model batches on its own thread at the same time."""
    return sum(m.generation.max_running_seqs if m.kind == "generate" else m.batching.max_batch_size
               for m in config.models)


def queue_capacity(config: Config) -> int:
    """Requests one replica holds before batchd refuses more itself (429 with Retry-After): per model
    its queue bound plus what is in flight, summed (one input per request)."""
    return sum(m.generation.max_queue + m.generation.max_running_seqs if m.kind == "generate"
               else m.batching.max_queue + m.batching.max_batch_size * m.batching.max_inflight_batches
               for m in config.models)


def deployment_options(config: Config, replicas: int | None = None) -> dict[str, Any]:
    """`serve.deployment` options from the config.

    max_ongoing_requests (Ray's cap on requests inside one replica) defaults to batchd's own queue
    bound, and never less than 2x the batch capacity (one batch running, the next one forming). Ray
    must not hold back what batchd would queue: requests over Ray's cap wait in Ray's router, which
    polls the replicas with a backoff of up to 0.5 s, so the replica idles while they wait (measured
    here with a cap of 2x the batch: 9 requests/s instead of 118 at 64 clients). Past its own bound
    batchd refuses at once (429 with Retry-After), where Ray would only queue. Ray's router still
    balances: it sends each request to the less busy of two replicas.
    The autoscaling target defaults to 1x the batch capacity: a replica gets company once it has a
    full batch waiting behind the running one, not before (a lower target splits load into small
    batches).
    """
    ray_cfg = config.ray
    capacity = batch_capacity(config)
    if 0 < ray_cfg.max_ongoing_requests < 2 * capacity:
        log.warning("ray.max_ongoing_requests = %d is under 2x the batch capacity (%d): Ray will hold back "
                    "requests that batchd could batch", ray_cfg.max_ongoing_requests, 2 * capacity)
    options: dict[str, Any] = {
        "name": APP_NAME,
        "max_ongoing_requests": ray_cfg.max_ongoing_requests or max(2 * capacity, queue_capacity(config)),
        "ray_actor_options": {"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus},
        # Ray drains a stopping replica (no new requests, ongoing ones finish) before its lifespan
        # closes the engines: the same bound as batchd's own drain on SIGTERM.
        "graceful_shutdown_timeout_s": config.server.drain_timeout_s,
        "health_check_period_s": ray_cfg.health_check_period_s,
        "logging_config": {"enable_access_log": False},  # as `batchd serve`: no line per request
    }
    if ray_cfg.max_replicas > 0:
        options["autoscaling_config"] = {
            "min_replicas": ray_cfg.min_replicas,
            "max_replicas": ray_cfg.max_replicas,
            "initial_replicas": max(ray_cfg.min_replicas, min(replicas or ray_cfg.num_replicas, ray_cfg.max_replicas)),
            "target_ongoing_requests": ray_cfg.target_ongoing_requests or capacity,
        }
    else:
        options["num_replicas"] = replicas or ray_cfg.num_replicas
    return options


@serve.ingress()  # no app here: each replica builds its own (engines are per process)
class BatchdReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config_from_dict(config)
        self.metrics: RayMetrics | None = None
        self._pusher: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self):
        self.instance = default_instance_id()
        self.metrics = RayMetrics()
        # on the replica's event loop, where the app's engines run too
        self._pusher = asyncio.create_task(self.metrics.run(), name="batchd-ray-metrics")
        self.batchd_app = create_app(self.config, metrics=self.metrics, instance=self.instance)
        self.batchd_app.state.stats_scope = STATS_SCOPE
        self.batchd_app.add_middleware(BodyFromScope)  # outermost: the body from Ray's proxy, at once
        return self.batchd_app

    async def check_health(self) -> None:
        """Ray's health check is /health's truth. The first check (before Ray routes any request
        here) waits for the models to load; a dead engine fails it, so Ray replaces the replica."""
        models = self.batchd_app.state.models
        while models.state == "loading":
            await asyncio.sleep(0.05)
        if models.state == "dead":
            states = {engine.name: engine.state for engine in models.engines}
            raise RuntimeError(f"batchd replica {self.instance}: engine dead ({states})")

    async def __del__(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()


def build_app(config: Config, replicas: int | None = None) -> Application:
    """The Serve application for `serve.run` (what `batchd ray` deploys)."""
    deployment = serve.deployment(BatchdReplica).options(**deployment_options(config, replicas))
    return deployment.bind(msgspec.to_builtins(config))


def app_builder(args: dict[str, Any]) -> Application:
    """For Ray's own CLI and config files (`serve run batchd.ray:app_builder config=config.toml`).

    args: `config` (path of config.toml; defaults when omitted), `set` (a list of
    `section.key=value` overrides, or one), `replicas` (overrides ray.num_replicas).
    """
    overrides = args.get("set", [])
    try:
        config = load_config(args.get("config"), [overrides] if isinstance(overrides, str) else list(overrides))
    except ConfigError as exc:
        raise ValueError(f"batchd: {exc}") from None
    replicas = args.get("replicas")
    return build_app(config, int(replicas) if replicas is not None else None)
