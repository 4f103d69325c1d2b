"""kvtier's one config schema: nested frozen dataclasses, loaded once from YAML and checked at start.

Every error names its key path (``engine.cache.block_size: must be a power of two``). Sections are defined
by the packages that use them (``workers.engine_config``) and composed here; nothing here does I/O after
``load_config`` returns, and nothing changes at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvstore.config import KVStoreConfig
from workers.engine_config import EngineConfig
from workers.validation import PRIORITY_RANGE


class ConfigError(ValueError):
    """The config is invalid; the message starts with the key path."""


@dataclass(frozen=True)
class WorkersConfig:
    count: int = 2  # workers (each one engine, possibly tensor-parallel)
    num_cpus: float = 1.0  # Ray CPUs reserved per worker
    num_gpus: int = 0  # Ray GPUs reserved per worker: its tensor-parallel size on GPU nodes, 0 on CPU
    max_restarts: int = -1  # Ray restarts of a dead worker (-1: always)
    host: str = "127.0.0.1"  # where a worker's gRPC endpoint listens; "node_ip": the Ray node's address

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count: must be >= 1, got {self.count}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the router's gRPC endpoint: on when cert_file and key_file are set (PEM files)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None  # set: clients must present a certificate this CA signed (mutual TLS)

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file: and key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file: needs cert_file and key_file (mutual TLS is TLS first)")


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token auth on the router: on when tokens_file is set (YAML, ``tenant: [token, ...]``)."""

    tokens_file: str | None = None


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"  # where the gRPC endpoint listens
    port: int = 50051
    policy: str = "cache_aware"  # cache_aware, least_loaded, round_robin
    max_in_flight: int = 256  # admitted requests; beyond it, RESOURCE_EXHAUSTED at once
    prefill_tokens_per_s: float = 20000.0  # cache_aware cost model until measured
    seconds_per_queued_request: float = 0.05
    health_port: int | None = None  # plaintext port serving only the gRPC health service (for probes)
    metrics_port: int | None = None  # Prometheus /metrics over HTTP (None: off)
    stall_timeout_s: float = 30.0  # a worker with requests and no engine step for this long stops taking requests
    drain_timeout_s: float = 60.0  # on SIGTERM, how long open streams may take to finish
    # the most urgent GenerateRequest.priority a client may ask for (a lower one is INVALID_ARGUMENT); None: any
    min_priority: int | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        if self.policy not in ("cache_aware", "least_loaded", "round_robin"):
            raise ValueError(f"policy: {self.policy!r} is unknown (known: cache_aware, least_loaded, round_robin)")
        for name in ("port", "health_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name}: {port} is not a TCP port")
        if self.stall_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("stall_timeout_s: must be > 0 (and drain_timeout_s >= 0)")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.min_priority is not None and not PRIORITY_RANGE[0] <= self.min_priority <= PRIORITY_RANGE[1]:
            raise ValueError(f"min_priority: must be an int32 (or null), got {self.min_priority}")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # an existing Ray cluster ("auto", "ray://..."); None starts a local one
    namespace: str = "kvtier"
    connect_timeout_s: float = 120.0  # how long `kvtier serve` waits for the Ray cluster at `address`
    # Ray's token auth: "token" (every Ray RPC carries the cluster's token) or "disabled" (a trusted network only)
    auth: str = "token"
    # the cluster's token; unset: Ray's own lookup ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
    auth_token_file: str | None = None

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {self.connect_timeout_s}")
        if self.auth not in ("token", "disabled"):
            raise ValueError(f"auth: must be token or disabled, got {self.auth!r}")
        if self.auth_token_file is not None and self.auth != "token":
            raise ValueError("auth_token_file: set, but auth is disabled")


@dataclass(frozen=True)
class KvtierConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    kvstore: KVStoreConfig = field(default_factory=KVStoreConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> KvtierConfig:
    """Read ``path`` (YAML; none = all defaults), apply ``overrides`` (nested dict, e.g. from CLI flags), check."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{path}: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return from_dict(KvtierConfig, _merge(data, overrides or {}))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking keys and types; errors carry the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(path, key)}: unknown key{hint}")
    values = {key: _convert(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # __post_init__ checks: "<field>: <why>"
        raise ConfigError(_join(path, str(error))) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(inner, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {type(value).__name__}")
        return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. memory: 0.8
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
