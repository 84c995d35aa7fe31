"""The served models: which engine answers a request, by its `model` field and the route's task."""
from __future__ import annotations

import orjson
from prometheus_client import generate_latest

from ..engine import Engine
from ..errors import InvalidRequest, ModelNotFound, NotFound
from ..metrics import PrometheusMetrics

_TASK_WORDS = {"embed": "embeddings", "generate": "text generation"}


class ServedModels:
    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines
        self.by_name = {engine.name: engine for engine in engines}
        self._unnamed_metrics = None

    def default(self, kind: str) -> Engine | None:
        """The first model of this task (where refusals before a model is known are counted)."""
        return next((e for e in self.engines if e.kind == kind), None)

    def resolve(self, name: str | None, kind: str) -> Engine:
        """The engine a request names, or the one model of the route's task when it names none."""
        if name is None:
            of_kind = [e for e in self.engines if e.kind == kind]
            if len(of_kind) == 1:
                return of_kind[0]
            if not of_kind:
                raise InvalidRequest(f"this server serves no {_TASK_WORDS[kind]} model "
                                     f"(it serves {self.describe()})", param="model")
            raise InvalidRequest(f"model is required: this server serves several {_TASK_WORDS[kind]} models "
                                 f"({', '.join(e.name for e in of_kind)})", param="model")
        engine = self.by_name.get(name)
        if engine is None:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {self.describe()}",
                                param="model")
        if engine.kind != kind:
            raise InvalidRequest(f"model {name!r} is a {_TASK_WORDS[engine.kind]} model and cannot serve "
                                 f"{_TASK_WORDS[kind]}", param="model")
        return engine

    def describe(self) -> str:
        return ", ".join(f"{e.name!r} ({_TASK_WORDS[e.kind]})" for e in self.engines)

    def metrics_for(self, name: str):
        engine = self.by_name.get(name)
        if engine is not None:
            return engine.metrics
        if self._unnamed_metrics is None:  # responses before any model was known: model=""
            exporter = getattr(self.engines[0].metrics, "exporter", None) or PrometheusMetrics()
            self._unnamed_metrics = exporter.for_model("")
        return self._unnamed_metrics

    # ---- the operations routes' data (a front end of `server.workers > 1` asks the engine process) --
    def stats_json(self) -> bytes:
        """/stats: the first model's figures at the top level (as before several models), every
        model's under "models"."""
        snaps = {e.name: e.snapshot() for e in self.engines}
        first = next(iter(snaps.values()))
        return orjson.dumps({**first, "models": snaps}, option=orjson.OPT_SERIALIZE_NUMPY)

    def reset_all(self) -> None:
        for engine in self.engines:
            engine.stats.reset()

    async def stats_body(self) -> bytes:
        return self.stats_json()

    async def reset_stats(self) -> None:
        self.reset_all()

    async def metrics_body(self, registry) -> bytes:
        if registry is None:  # the engines record into another exporter: Ray's, under batchd/ray
            raise NotFound("under Ray, metrics are exported by Ray's metrics system (ray_batchd_*, on each "
                           "node's metrics export port), not by a replica")
        return generate_latest(registry)

    def registry(self):
        """The Prometheus registry the engines record into."""
        exporter = getattr(self.engines[0].metrics, "exporter", None)
        return exporter.registry if exporter is not None else None

    @property
    def state(self) -> str:
        """The whole server's state: ready only when every model is."""
        states = [e.state for e in self.engines]
        for state in ("dead", "loading", "draining", "stopped"):
            if state in states:
                return state
        return "ready"
