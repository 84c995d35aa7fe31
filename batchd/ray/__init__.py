"""batchd on Ray Serve (pip install .[ray]): `batchd ray --config config.toml --replicas N`, or Ray's
own `serve run batchd.ray:app_builder config=config.toml` / `serve deploy` with a Serve config file.

Attributes load lazily: Ray's proxy imports batchd.ray.proxy alone, without torch or the engine.
"""
from __future__ import annotations

from typing import Any

__all__ = ["app_builder", "build_app", "deployment_options"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
