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
