"""The worker's configuration: flags, ``PDSERVE_*`` environment and a YAML file merged
into one frozen ``WorkerConfig`` (wrapping the engine's ``EngineConfig``), built once
in ``cli`` and passed down.

Precedence, lowest first: defaults < YAML file < environment < command-line flags.
Every error is a ``ConfigError`` with a one-line message naming the field.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from pdserve.cluster.access import ClusterAccess
from pdserve.common.tracing import endpoint_problem
from pdserve.engine.config import ConfigError, EngineConfig, coerce_field, load_yaml

KV_SEND_MODES = ("auto", "layerwise", "whole")


@dataclass(frozen=True)
class WorkerConfig(ClusterAccess):
    """The worker's settings around its engine's; the connection ones (etcd, namespace,
    cluster secret, TLS) are ``ClusterAccess``'s. The cluster secret comes from
    PDSERVE_CLUSTER_SECRET or --cluster-secret-file."""

    engine: EngineConfig
    host: str = "0.0.0.0"
    grpc_port: int = 0
    metrics_port: int = 0
    advertise_host: str = ""
    worker_id: str = ""
    drain_timeout: float = 30.0
    lease_ttl: int = 10
    load_interval: float = 1.0
    # Disaggregation (see services/prefill and services/decode).
    kv_transfer: bool = True
    kv_send: str = "auto"  # layerwise on accelerators, whole on CPU (see resolve_kv_send)
    local_prefill_threshold: int = 32
    remote_prefill_timeout: float = 120.0
    kv_transfer_timeout: float = 30.0
    debug_rpcs: bool = False
    otlp_endpoint: str = ""  # OpenTelemetry spans go to this OTLP gRPC collector; "" = tracing off

    def __post_init__(self) -> None:
        self.check_access(ConfigError, "PDSERVE_")
        for name in ("grpc_port", "metrics_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ConfigError(f"{name}={value!r} is invalid: expected a port in [0, 65535]")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout={self.drain_timeout!r} is invalid: expected seconds >= 0")
        if not isinstance(self.lease_ttl, int) or self.lease_ttl < 2:
            raise ConfigError(f"lease_ttl={self.lease_ttl!r} is invalid: expected an integer >= 2 (seconds)")
        if not self.load_interval > 0:
            raise ConfigError(f"load_interval={self.load_interval!r} is invalid: expected seconds > 0")
        if self.kv_send not in KV_SEND_MODES:
            raise ConfigError(f"kv_send={self.kv_send!r} is invalid: expected one of {', '.join(KV_SEND_MODES)}")
        if not isinstance(self.local_prefill_threshold, int) or self.local_prefill_threshold < 0:
            raise ConfigError(f"local_prefill_threshold={self.local_prefill_threshold!r} is invalid: "
                              "expected an integer >= 0 (tokens)")
        for name in ("remote_prefill_timeout", "kv_transfer_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected seconds > 0")
        problem = endpoint_problem(self.otlp_endpoint)
        if problem is not None:
            raise ConfigError(f"otlp_endpoint={problem}")

    @property
    def role(self) -> str:
        return self.engine.role

WORKER_KEYS = tuple(f.name for f in dataclasses.fields(WorkerConfig) if f.name != "engine")
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def build_worker_config(flags: Mapping[str, Any], environ: Mapping[str, str],
                        config_path: str | None = None) -> WorkerConfig:
    """Merge YAML < env < flags (``None`` flags are "not given") into one WorkerConfig."""
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(load_yaml(config_path))
    merged.update(_env_values(environ))
    merged.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(merged) - set(WORKER_KEYS) - set(ENGINE_KEYS))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(WORKER_KEYS + ENGINE_KEYS)}")
    engine = EngineConfig.from_mapping({k: v for k, v in merged.items() if k in ENGINE_KEYS})
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    worker = {k: coerce_field(fields[k], v) for k, v in merged.items() if k in WORKER_KEYS}
    config = WorkerConfig(engine=engine, **worker)
    return _resolve_identity(config)


def resolve_kv_send(mode: str, device_type: str) -> str:
    """``auto``: layer by layer on accelerators, where the copy engines overlap the
    sends with compute; in one write on CPU, where the copy takes the cores the
    prefill needs (measured slower layer by layer, docs/benchmarks.md)."""
    if mode != "auto":
        return mode
    return "whole" if device_type == "cpu" else "layerwise"


def _env_values(environ: Mapping[str, str], prefix: str = "PDSERVE_") -> dict[str, str]:
    out = EngineConfig.env_overrides(environ, prefix)
    for key in WORKER_KEYS:
        if f"{prefix}{key.upper()}" in environ:
            out[key] = environ[f"{prefix}{key.upper()}"]
    return out


def _resolve_identity(config: WorkerConfig) -> WorkerConfig:
    """Fill the advertised host and a unique worker id when not given."""
    host = config.advertise_host or config.host
    if host in ("0.0.0.0", "::", ""):
        host = _routable_host()
    worker_id = config.worker_id or f"{config.role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return dataclasses.replace(config, advertise_host=host, worker_id=worker_id)


def _routable_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
