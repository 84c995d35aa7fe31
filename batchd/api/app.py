"""The Starlette application: routes, error handlers, and the engine's lifespan."""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import Route

from ..config import Config
from ..engine import Engine
from . import routes
from .errors import HANDLERS


def create_app(config: Config, engine: Engine | None = None) -> Starlette:
    """The engine starts loading at startup in the background, so /health answers 503 meanwhile."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loading = asyncio.create_task(app.state.engine.start())
        try:
            yield
        finally:
            loading.cancel()
            await app.state.engine.close()

    app = Starlette(
        routes=[
            Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
            Route("/embeddings", routes.embeddings, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/stats", routes.stats, methods=["GET"]),
            Route("/stats/reset", routes.stats_reset, methods=["POST"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.state.engine = engine or Engine(config)
    app.state.api_key = os.environ.get("BATCHD_API_KEY") or config.server.api_key
    return app
