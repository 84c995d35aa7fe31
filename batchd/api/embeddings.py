"""POST /v1/embeddings: decode and validate (msgspec), tokenize, hand to the engine, encode (orjson).

The route is a plain ASGI callable, not a Starlette `Request -> Response` function: that wrapper costs
two coroutines, two closures and a Response object per request, a measurable share of a request at
thousands per second. Errors still become OpenAI-shaped answers: they are raised before anything is
sent, and Starlette's exception middleware answers them with batchd's handlers."""
from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

import msgspec
import numpy as np
from starlette.types import Receive, Scope, Send

from ..embed.engine import EmbedEngine
from ..errors import BatchdError, InvalidRequest
from ..types import ItemResult
from .models import ServedModels
from .routes import DisconnectWatch, read_json, send_json
from .schemas import EmbeddingRequest

log = logging.getLogger("batchd.api")
_decoder = msgspec.json.Decoder(EmbeddingRequest)


@dataclass(slots=True)
class _Admitted:
    """A request that passed every check before the queue: what the engine needs to run it."""
    engine: EmbedEngine
    body: EmbeddingRequest
    token_ids: list[np.ndarray]
    received: float
    deadline: float
    tokenize_s: float


async def embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    models: ServedModels = scope["app"].state.models
    try:  # refusals before the engine accepts the request are counted by reason
        admitted = await _validate_and_tokenize(scope, receive, models)
    except BatchdError as exc:
        engine = models.by_name.get(scope.get("state", {}).get("model", "")) or models.default("embed")
        if engine is not None:
            engine.stats.request_rejected(exc.code or type(exc).__name__)
        raise
    engine = admitted.engine
    client_gone = DisconnectWatch(receive)
    try:
        results = await engine.embed(admitted.token_ids, admitted.deadline, client_gone.future, admitted.tokenize_s)
    finally:
        client_gone.close()
    req = admitted.body
    prompt_tokens = int(sum(len(t) for t in admitted.token_ids))
    data = [{"object": "embedding", "index": i, "embedding": _encode(r.vector, req.dimensions, req.encoding_format)}
            for i, r in enumerate(results)]
    payload = {"object": "list", "data": data, "model": engine.name,
               "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
    await send_json(send, payload, _timing_headers(results, time.monotonic() - admitted.received))


async def _validate_and_tokenize(scope: Scope, receive: Receive, models: ServedModels) -> _Admitted:
    req, received, deadline = await read_json(scope, receive, _decoder)
    engine = models.resolve(req.model, "embed")
    scope.setdefault("state", {})["model"] = engine.name  # request.state.model, for ResponseHooks
    backend = engine.backend
    if req.dimensions is not None and not 1 <= req.dimensions <= backend.dim:
        raise InvalidRequest(f"dimensions must be within 1..{backend.dim}", param="dimensions")
    engine.check_accepting()  # before tokenizing: a loading or draining server answers at once
    texts, token_rows = split_inputs(req.input, engine.batching.max_inputs_per_request)
    truncate = engine.model_config.truncate if req.truncate is None else req.truncate
    started = time.perf_counter()
    if texts is not None:
        if engine.server_config.log_inputs:
            log.info("embedding inputs: %r", texts)
        token_ids = backend.tokenize(texts, truncate)
    else:
        token_ids = backend.check_token_ids(token_rows, truncate)  # type: ignore[arg-type]
    return _Admitted(engine, req, token_ids, received, deadline, time.perf_counter() - started)


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


def _encode(vector: np.ndarray, dimensions: int | None, fmt: str) -> np.ndarray | str:
    if dimensions is not None and dimensions < len(vector):
        vector = vector[:dimensions]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # re-normalise what is kept
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector


def _timing_headers(results: list[ItemResult], total_s: float) -> list[tuple[bytes, bytes]]:
    """TEI-style timings, plus the size and padding of the batch the (slowest) input rode in."""
    slowest = max(results, key=lambda r: r.queue_s + r.inference_s)
    return [
        (b"x-queue-time", b"%.2f" % (slowest.queue_s * 1e3)),
        (b"x-inference-time", b"%.2f" % (slowest.inference_s * 1e3)),
        (b"x-total-time", b"%.2f" % (total_s * 1e3)),
        (b"x-batch-size", b"%d" % slowest.batch_size),
        (b"x-batch-padding", b"%.4f" % slowest.batch_padding),
    ]


