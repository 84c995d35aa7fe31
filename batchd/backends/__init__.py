"""Model-specific work: tokenize (event-loop thread) and embed a batch (model thread)."""
from __future__ import annotations

from ..config import ModelConfig
from .base import Backend


def make_backend(cfg: ModelConfig) -> Backend:
    if cfg.backend == "fake":
        from .fake import FakeBackend
        return FakeBackend(cfg)
    from .embed import EmbedBackend
    return EmbedBackend(cfg)


__all__ = ["Backend", "make_backend"]
