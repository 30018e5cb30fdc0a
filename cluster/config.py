"""The cluster's YAML config: dataclasses with documented defaults, validated once at load.

Every key but `model` has a default; an unknown key is an error naming its dotted path. File
paths in a YAML (the model, TLS and API key files) are relative to the YAML's folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve.api.kv_events import HEARTBEAT_S
from pdserve.router.placement import POLICIES

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("cpu", "cuda")
# The keys that name files, as (section or None, key).
PATH_KEYS = (
    (None, "model"),
    ("router", "tls_cert"),
    ("router", "tls_key"),
    ("router", "api_keys_file"),
)


class ConfigError(ValueError):
    """A config key is unknown, missing or has a bad value; the message names the key."""


@dataclass(frozen=True)
class KVCacheConfig:
    num_blocks: int | None = None  # blocks per worker; wins over memory_fraction
    memory_fraction: float = 0.05  # of GPU memory on CUDA, of RAM on CPU, when num_blocks unset


@dataclass(frozen=True)
class PrefillConfig:
    workers: int = 1
    tp: int = 1
    token_budget: int = 2048  # tokens per prefill step; longer prompts are chunked
    max_num_seqs: int = 256  # prompts in one prefill step


@dataclass(frozen=True)
class DecodeConfig:
    workers: int = 1
    tp: int = 1
    max_num_seqs: int = 256  # sequences in one decode batch
    token_budget: int = 2048  # tokens per decode step, when it prefills a request itself


@dataclass(frozen=True)
class KVTransferConfig:
    timeout_s: float = 30.0  # a transfer silent this long fails and falls back


@dataclass(frozen=True)
class SupervisionConfig:
    # NOTE: Ray restarts a worker's process at once; the router asks it whether it is back
    # after restart_backoff_s, then at doubling intervals up to restart_max_backoff_s.
    max_restarts: int = 5  # per worker over the cluster's life (-1: no limit); then it is dead
    restart_backoff_s: float = 0.2
    restart_max_backoff_s: float = 5.0
    # A decode worker that sends nothing for this long (its engine thread sends a heartbeat
    # every second, idle or not) is stuck, and restarted: above the longest step (a long local
    # prefill chunk on CPU takes seconds).
    stall_timeout_s: float = 120.0


@dataclass(frozen=True)
class RouterConfig:
    listen: str = "127.0.0.1:50051"
    # HOST:PORT of the HTTP door: the OpenAI-compatible API under /v1/ and /metrics (off when
    # unset); same TLS and API keys as `listen`.
    openai_listen: str | None = None
    # HOST:PORT serving only /metrics, for a router without the OpenAI API.
    metrics_listen: str | None = None
    policy: str = "cache_aware"
    max_inflight: int = 1024  # requests from arrival to end; beyond this, RESOURCE_EXHAUSTED
    max_queued: int = 1024  # requests waiting for KV blocks; beyond this, RESOURCE_EXHAUSTED
    cache_weight: float = 2.0  # cache_aware: an uncached prompt token costs this many in flight
    local_prefill_max_tokens: int = 256  # cache_aware: a shorter uncached tail stays on decode
    request_table_size: int = 10_000  # finished requests kept for resume_from
    request_table_ttl_s: float = 600.0  # and for at most this long
    # NOTE: secrets live in files named here, never in the YAML itself.
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, the router serves TLS
    tls_key: str | None = None  # PEM private key
    api_keys_file: str | None = None  # one key per line; RPCs then need `Bearer <key>`


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    threads_per_worker: int = 1
    prefix_caching: bool = True  # reuse cached prompt blocks on every worker
    cuda_graphs: bool = True  # decode workers replay decode steps from CUDA graphs (CUDA)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        _check(
            self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be 'cpu' or 'cuda'",
        )
        _check(self.block_size >= 1, "block_size", "must be >= 1")
        _check(self.threads_per_worker >= 1, "threads_per_worker", "must be >= 1")
        _check(
            self.kv_cache.num_blocks is None or self.kv_cache.num_blocks >= 1,
            "kv_cache.num_blocks",
            "must be >= 1",
        )
        _check(
            0 < self.kv_cache.memory_fraction <= 0.95,
            "kv_cache.memory_fraction",
            "must be in (0, 0.95]",
        )
        for role in ("prefill", "decode"):
            part = getattr(self, role)
            _check(part.workers >= 1, f"{role}.workers", "must be >= 1")
            _check(part.tp >= 1, f"{role}.tp", "must be >= 1")
        for key in (
            "prefill.token_budget",
            "prefill.max_num_seqs",
            "decode.token_budget",
            "decode.max_num_seqs",
        ):
            role, name = key.split(".")
            _check(getattr(getattr(self, role), name) >= 1, key, "must be >= 1")
        _check(self.kv_transfer.timeout_s > 0, "kv_transfer.timeout_s", "must be > 0")
        sup = self.supervision
        _check(sup.max_restarts >= -1, "supervision.max_restarts", "must be >= -1")
        _check(sup.restart_backoff_s > 0, "supervision.restart_backoff_s", "must be > 0")
        _check(
            sup.restart_max_backoff_s >= sup.restart_backoff_s,
            "supervision.restart_max_backoff_s",
            "must be >= supervision.restart_backoff_s",
        )
        _check(
            sup.stall_timeout_s >= 3 * HEARTBEAT_S,
            "supervision.stall_timeout_s",
            f"must be >= {3 * HEARTBEAT_S:g} (workers send a heartbeat every {HEARTBEAT_S:g} s)",
        )
        _check(
            self.router.policy in POLICIES, "router.policy", f"must be one of {', '.join(POLICIES)}"
        )
        _check(self.router.max_inflight >= 1, "router.max_inflight", "must be >= 1")
        _check(self.router.max_queued >= 0, "router.max_queued", "must be >= 0")
        _check(self.router.cache_weight >= 0, "router.cache_weight", "must be >= 0")
        _check(
            self.router.local_prefill_max_tokens >= 0,
            "router.local_prefill_max_tokens",
            "must be >= 0",
        )
        _check(self.router.request_table_size >= 1, "router.request_table_size", "must be >= 1")
        _check(self.router.request_table_ttl_s > 0, "router.request_table_ttl_s", "must be > 0")
        for key in ("listen", "openai_listen", "metrics_listen"):
            value = getattr(self.router, key)
            host, sep, port = (value or "").rpartition(":")
            ok = value is None or bool(sep and host and port.isdigit())
            _check(ok, f"router.{key}", "must be HOST:PORT")
        _check(
            self.router.openai_listen is None or self.router.metrics_listen is None,
            "router.metrics_listen",
            "/metrics is served on router.openai_listen already; set one of the two",
        )
        _check_tls(self.router)
        if self.router.api_keys_file is not None:
            read_api_keys(self.router.api_keys_file)


def _check_tls(router: RouterConfig) -> None:
    cert, key = router.tls_cert, router.tls_key
    _check(key is None or cert is not None, "router.tls_cert", "required with router.tls_key")
    _check(cert is None or key is not None, "router.tls_key", "required with router.tls_cert")
    for name, path, marker in (
        ("tls_cert", cert, "-----BEGIN CERTIFICATE-----"),
        ("tls_key", key, "PRIVATE KEY-----"),
    ):
        if path is not None:
            _check(marker in _read(path, f"router.{name}"), f"router.{name}", f"{path} is not PEM")


def _read(path: str, key: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from e


def read_api_keys(path: str) -> tuple[str, ...]:
    """The keys in an API keys file: one per line; blank lines and `#` comments are skipped.
    Errors name `router.api_keys_file` and a line number, never a key."""
    keys = []
    for number, line in enumerate(_read(path, "router.api_keys_file").splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        _check(
            key.isascii() and key.isprintable() and " " not in key,
            "router.api_keys_file",
            f"{path} line {number}: a key must be printable ASCII without spaces",
        )
        keys.append(key)
    _check(bool(keys), "router.api_keys_file", f"{path} holds no key")
    return tuple(keys)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def config_from_dict(values: dict[str, Any]) -> ClusterConfig:
    return _build(ClusterConfig, values, "")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterConfig:
    """Loads a YAML config; its relative file paths are taken from the YAML's folder. Keys in
    `overrides` (nested like the YAML, paths relative to the current directory) win."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a mapping")
    values = _resolve_paths(values, path.resolve().parent)
    return config_from_dict(_merge(values, _resolve_paths(overrides or {}, Path.cwd())))


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for section, key in PATH_KEYS:
        holder = out if section is None else out.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            holder[key] = str(base / Path(holder[key]).expanduser())
    return out


def _merge(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
