"""The Starlette application: routes, error handlers, the engines' lifespan, per-response metrics."""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import AsyncIterator, Sequence

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import runtime
from ..config import Config
from ..engine import Engine, make_engine
from ..metrics import PrometheusMetrics
from . import completions, embeddings, routes
from .errors import HANDLERS
from .instance import default_instance_id
from .models import ServedModels
from .routes import RawEndpoint


def create_app(config: Config, engines: Engine | Sequence[Engine] | None = None, metrics=None,
               instance: str | None = None, remote=None) -> Starlette:
    """One engine per configured model (or the given ones). The engines start loading at startup in
    the background, so /health answers 503 meanwhile. `metrics` is the exporter the engines record
    into (Prometheus by default; batchd/ray passes Ray's); `instance` names this process in the
    x-batchd-instance header of every response. `remote` (a batchd.frontend EngineClient) makes
    this app a front end of `server.workers > 1`: its engines live in the engine process."""
    if remote is not None:
        from ..frontend.client import RemoteServed
        served: ServedModels = RemoteServed(remote)
        lifespan = _front_end_lifespan(remote)
    else:
        if isinstance(engines, Engine):
            engines = [engines]
        if engines is None:
            metrics = metrics or PrometheusMetrics()
            engines = [make_engine(config, model, metrics.for_model(model.name)) for model in config.models]
        served = ServedModels(list(engines))
        lifespan = _engines_lifespan(served)

    app = Starlette(
        routes=[
            Route("/v1/embeddings", RawEndpoint(embeddings.embeddings), methods=["POST"]),
            Route("/embeddings", RawEndpoint(embeddings.embeddings), methods=["POST"]),
            Route("/v1/chat/completions", completions.chat_completions, methods=["POST"]),
            Route("/v1/completions", completions.completions, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/stats", routes.stats, methods=["GET"]),
            Route("/stats/reset", routes.stats_reset, methods=["POST"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.state.models = served
    app.state.config = config
    app.state.started = time.monotonic()
    app.state.registry = getattr(metrics, "registry", None) or served.registry()
    app.state.api_key = os.environ.get("BATCHD_API_KEY") or config.server.api_key
    app.state.instance = instance or default_instance_id()
    app.state.stats_scope = "server"  # batchd/ray sets "replica": each replica's /stats is its own
    app.add_middleware(ResponseHooks, instance_id=app.state.instance, served=served)
    return app


def _engines_lifespan(served: ServedModels):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = [asyncio.create_task(engine.start()) for engine in served.engines]
        try:
            yield
        finally:
            for task in loading:
                task.cancel()
            await asyncio.gather(*(engine.close() for engine in served.engines))
    return lifespan


def _front_end_lifespan(client):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await client.connect()  # serve only once the engines' states are known
        runtime.settle()  # no model thread here: the GC settings only
        try:
            yield
        finally:
            client.close()
    return lifespan


_NOT_COUNTED = {"/health", "/metrics"}  # probes and scrapes: a loading server's 503s are not errors


class ResponseHooks:
    """What every response gets, in one pure-ASGI layer (each layer costs a coroutine and a send
    wrapper per request): the `x-batchd-instance` header (which process answered: behind a load
    balancer or Ray Serve's proxy a client tells replicas apart by it) and, with `served`,
    batchd_http_responses_total{model,status} for every API answer, refusals included. A route that
    resolved its model puts the name in request.state.model."""

    def __init__(self, app: ASGIApp, instance_id: str, served: ServedModels | None = None) -> None:
        self.app = app
        self.header = (b"x-batchd-instance", instance_id.encode("latin-1", "replace"))
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = self.served is not None and scope["path"] not in _NOT_COUNTED

        async def send_with_hooks(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
                if counted:
                    model = (scope.get("state") or {}).get("model", "")
                    self.served.metrics_for(model).inc("batchd_http_responses", label=str(message["status"]))
            await send(message)

        await self.app(scope, receive, send_with_hooks)
