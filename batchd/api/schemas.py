"""Request bodies, decoded and type-checked by msgspec in one pass."""
from __future__ import annotations

from typing import Literal

import msgspec


class EmbeddingRequest(msgspec.Struct):
    # msgspec allows one array type per union, so the list's items are checked for sameness later.
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate: bool | None = None  # batchd extension: cut over-long inputs instead of refusing them


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatMessage(msgspec.Struct):
    role: str
    # a string, or OpenAI's list of content parts ({"type": "text", "text": ...})
    content: str | list[dict] | None = None
    name: str | None = None


class _GenerationRequest(msgspec.Struct, kw_only=True):
    """The parameters chat and completions share (OpenAI's, plus vLLM's ignore_eos and min_tokens).
    Unknown fields are ignored, as OpenAI-compatible servers do for parameters they do not use."""
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are given
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    user: str | None = None


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    messages: list[ChatMessage]


class CompletionRequest(_GenerationRequest, kw_only=True):
    prompt: str | list[int]
