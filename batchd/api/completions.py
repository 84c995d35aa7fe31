"""POST /v1/chat/completions and /v1/completions: validate, tokenize (chat template), start a sequence,
answer whole or as Server-Sent Events exactly as OpenAI sends them."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

import msgspec
import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..backends.generate import Sampling
from ..errors import BatchdError, InvalidRequest
from ..generate.engine import GenerateEngine, GenerationParams
from .routes import DisconnectWatch, json_response, read_json_request, served
from .schemas import ChatCompletionRequest, CompletionRequest

_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def _generate(request: Request, chat: bool) -> Response:
    models = served(request)
    try:  # refusals before the engine accepts the request are counted by reason
        req, received, deadline = await read_json_request(request, _chat_decoder if chat else _completion_decoder)
        engine: GenerateEngine = models.resolve(req.model, "generate")  # type: ignore[assignment]
        request.state.model = engine.name
        params = _params(req, engine)
        engine.check_accepting()
        started = time.perf_counter()
        prompt = _prompt(req, engine, chat)
        max_tokens = engine.check_prompt(prompt, params.max_tokens, "messages" if chat else "prompt")
        tokenize_s = time.perf_counter() - started
    except BatchdError as exc:
        engine = models.by_name.get(getattr(request.state, "model", "")) or models.default("generate")
        if engine is not None:
            engine.stats.request_rejected(exc.code or type(exc).__name__)
        raise
    seq = engine.admit(prompt, params, max_tokens, deadline, tokenize_s)
    shape = _Shape(chat, engine.name, len(prompt))
    watch = DisconnectWatch(request.receive)
    chunks = engine.stream(seq, watch.future)
    try:
        if not req.stream:
            text, finish = [], None
            async for delta, finish in chunks:
                text.append(delta)
            return json_response(shape.whole("".join(text), finish, len(seq.generated)))
        first = await chunks.__anext__()  # errors before the first token (504, 503) are still HTTP errors
    finally:
        watch.close()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_sse(shape, first, chunks, seq, include_usage), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _params(req, engine: GenerateEngine) -> GenerationParams:
    if req.n != 1:
        raise InvalidRequest("only n = 1 is supported", param="n")
    if not 0 <= req.temperature <= 2:
        raise InvalidRequest("temperature must be within 0..2", param="temperature")
    if not 0 < req.top_p <= 1:
        raise InvalidRequest("top_p must be within (0, 1]", param="top_p")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{param} must be >= 1", param=param)
    if req.min_tokens < 0 or (max_tokens is not None and req.min_tokens > max_tokens):
        raise InvalidRequest(f"min_tokens must be within 0..{param}", param="min_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    limit = engine.model_config.generation.max_stop_sequences
    if len(stops) > limit or any(not s for s in stops):
        raise InvalidRequest(f"stop takes at most {limit} non-empty strings", param="stop")
    sampling = Sampling(req.temperature, req.top_p, req.seed)
    return GenerationParams(max_tokens, req.min_tokens, req.ignore_eos, stops, sampling)


def _prompt(req, engine: GenerateEngine, chat: bool) -> np.ndarray:
    if not chat:
        if isinstance(req.prompt, str):
            return engine.backend.tokenize_prompt(req.prompt)
        if any(not 0 <= t < engine.backend.vocab_size for t in req.prompt):
            raise InvalidRequest(f"token ids must be within 0..{engine.backend.vocab_size - 1}", param="prompt")
        return np.asarray(req.prompt, dtype=np.int64)
    if not req.messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):  # content parts: text only
            if any(part.get("type") != "text" for part in content):
                raise InvalidRequest("only text content parts are supported", param=f"messages[{i}].content")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": m.role, "content": content or ""})
    return engine.backend.tokenize_chat(messages)


class _Shape:
    """The OpenAI response objects, for chat or plain completions."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, finish: str | None, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, finish: str | None, role: bool = False, usage: dict | None = None,
              with_usage: bool = False) -> bytes:
        if usage is not None:
            choices = []
        elif self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        body = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                "created": self.created, "model": self.model, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"


async def _sse(shape: _Shape, first: tuple[str, str | None], chunks: AsyncIterator, seq,
               include_usage: bool) -> AsyncIterator[bytes]:
    """data: {chunk} events, a last chunk with the finish reason, the usage chunk when asked, [DONE].
    An error after the first byte cannot change the status: it goes out as an error event."""
    try:
        if shape.chat:
            yield shape.chunk(None, None, role=True, with_usage=include_usage)
        text, finish = first
        while True:
            if text:
                yield shape.chunk(text, None, with_usage=include_usage)
            if finish is not None:
                yield shape.chunk(None, finish, with_usage=include_usage)
                break
            text, finish = await chunks.__anext__()
        if include_usage:
            yield shape.chunk(None, None, usage=shape.usage(len(seq.generated)), with_usage=True)
        yield b"data: [DONE]\n\n"
    except BatchdError as exc:
        body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        yield b"data: " + orjson.dumps(body) + b"\n\n"
    finally:
        await chunks.aclose()
