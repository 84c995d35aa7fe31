"""HTTP handlers: decode and validate (msgspec), tokenize, hand to the engine, encode (orjson)."""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..engine import Engine
from ..errors import (BatchdError, ClientDisconnected, InvalidRequest, ModelNotFound, PayloadTooLarge, Unauthorized,
                      UnsupportedMediaType)
from ..types import ItemResult
from .schemas import EmbeddingRequest

log = logging.getLogger("batchd.api")
_decoder = msgspec.json.Decoder(EmbeddingRequest)


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def check_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass `limit` (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before sending its whole body: a 499, not an unexpected error
        raise ClientDisconnected("client disconnected while sending the request body") from None
    return b"".join(chunks)


def decode_request(body: bytes) -> EmbeddingRequest:
    try:
        return _decoder.decode(body)
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


def split_inputs(raw: object, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id rows); refuses empty, mixed and too many inputs."""
    if isinstance(raw, str):
        rows: list = [raw]
    else:
        assert isinstance(raw, list)
        if not raw:
            raise InvalidRequest("input must not be an empty list", param="input")
        rows = raw
    kinds = {type(x) for x in rows}
    if kinds == {int}:  # one token-id list
        return None, [rows]
    if len(rows) > max_inputs:
        raise InvalidRequest(f"input has {len(rows)} items, more than max_inputs_per_request={max_inputs}",
                             param="input")
    if kinds == {str}:
        for i, text in enumerate(rows):
            if not text:
                raise InvalidRequest("input must not contain empty strings",
                                     param="input" if isinstance(raw, str) else f"input[{i}]")
        return rows, None
    if kinds == {list}:
        return None, rows
    raise InvalidRequest("input must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists, not a mix", param="input")


def request_timeout(request: Request, default: float) -> float:
    header = request.headers.get("x-request-timeout")
    if header is None:
        return default
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidRequest("x-request-timeout must be a positive number of seconds", param="x-request-timeout")
    return min(value, default)  # a client may shorten its deadline, not lengthen it


@dataclass(slots=True)
class _Admitted:
    """A request that passed every check before the queue: what the engine needs to run it."""
    body: EmbeddingRequest
    token_ids: list[np.ndarray]
    received: float
    deadline: float
    tokenize_s: float


async def embeddings(request: Request) -> Response:
    engine = _engine(request)
    try:  # refusals before the engine accepts the request are counted by reason
        admitted = await _validate_and_tokenize(request, engine)
    except BatchdError as exc:
        engine.stats.request_rejected(exc.code or type(exc).__name__)
        raise
    client_gone = DisconnectWatch(request)
    try:
        results = await engine.embed(admitted.token_ids, admitted.deadline, client_gone.future, admitted.tokenize_s)
    finally:
        client_gone.close()
    req = admitted.body
    prompt_tokens = int(sum(len(t) for t in admitted.token_ids))
    data = [{"object": "embedding", "index": i, "embedding": _encode(r.vector, req.dimensions, req.encoding_format)}
            for i, r in enumerate(results)]
    payload = {"object": "list", "data": data, "model": engine.backend.name,
               "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    return json_response(payload, headers=_timing_headers(results, time.monotonic() - admitted.received))


async def _validate_and_tokenize(request: Request, engine: Engine) -> _Admitted:
    check_api_key(request)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(f"content type {ctype!r} is not supported: send application/json")
    server_cfg = engine.config.server
    received = time.monotonic()
    deadline = received + request_timeout(request, server_cfg.request_timeout_s)
    req = decode_request(await read_body(request, server_cfg.max_body_bytes))
    backend = engine.backend
    if req.model is not None and req.model != backend.name:
        raise ModelNotFound(f"model {req.model!r} is not served here; this server serves {backend.name!r}",
                            param="model")
    if req.dimensions is not None and not 1 <= req.dimensions <= backend.dim:
        raise InvalidRequest(f"dimensions must be within 1..{backend.dim}", param="dimensions")
    engine.check_accepting()  # before tokenizing: a loading or draining server answers at once
    texts, token_rows = split_inputs(req.input, engine.config.batching.max_inputs_per_request)
    truncate = engine.config.model.truncate if req.truncate is None else req.truncate
    started = time.perf_counter()
    if texts is not None:
        if server_cfg.log_inputs:
            log.info("embedding inputs: %r", texts)
        token_ids = backend.tokenize(texts, truncate)
    else:
        token_ids = backend.check_token_ids(token_rows, truncate)  # type: ignore[arg-type]
    return _Admitted(req, token_ids, received, deadline, time.perf_counter() - started)


class DisconnectWatch:
    """`future` resolves when the client goes away (the server sends http.disconnect). Watching
    costs a task per request, so it starts only once a request has waited WATCH_AFTER_S: a quick
    answer needs no watch, and a client that leaves a slow one is still noticed while queued."""

    WATCH_AFTER_S = 0.05

    def __init__(self, request: Request) -> None:
        loop = asyncio.get_running_loop()
        self._receive = request.receive
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
            self._task.cancel()


def _encode(vector: np.ndarray, dimensions: int | None, fmt: str) -> np.ndarray | str:
    if dimensions is not None and dimensions < len(vector):
        vector = vector[:dimensions]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # re-normalise what is kept
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector


def _timing_headers(results: list[ItemResult], total_s: float) -> dict[str, str]:
    """TEI-style timings, plus the size and padding of the batch the (slowest) input rode in."""
    slowest = max(results, key=lambda r: r.queue_s + r.inference_s)
    return {
        "x-queue-time": f"{slowest.queue_s * 1e3:.2f}",
        "x-inference-time": f"{slowest.inference_s * 1e3:.2f}",
        "x-total-time": f"{total_s * 1e3:.2f}",
        "x-batch-size": str(slowest.batch_size),
        "x-batch-padding": f"{slowest.batch_padding:.4f}",
    }


async def models(request: Request) -> Response:
    check_api_key(request)
    engine = _engine(request)
    created = int(time.time() - engine.stats.snapshot()["uptime_s"])
    return json_response({"object": "list", "data": [
        {"id": engine.backend.name, "object": "model", "created": created, "owned_by": "batchd"}]})


async def health(request: Request) -> Response:
    engine = _engine(request)
    body = {"status": engine.state}
    if engine.failure:
        body["failure"] = engine.failure
    return json_response(body, status=200 if engine.state == "ready" else 503)


async def stats(request: Request) -> Response:
    check_api_key(request)
    engine = _engine(request)
    return json_response({"model": engine.backend.name, "state": engine.state,
                          "max_batch_tokens": engine.scheduler.params.max_batch_tokens,
                          "cost_model": engine.scheduler.cost.snapshot(), **engine.stats.snapshot()})


async def stats_reset(request: Request) -> Response:
    check_api_key(request)
    _engine(request).stats.reset()
    return json_response({"reset": True})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_engine(request).stats.metrics.registry), media_type=CONTENT_TYPE_LATEST)
