"""The router's configuration, built once from flags (and ``PDSERVE_ROUTER_*`` env) in ``cli``.

Precedence, lowest first: defaults < environment < command-line flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from pdserve.cluster.access import ClusterAccess
from pdserve.common.tracing import endpoint_problem

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


class RouterConfigError(ValueError):
    """A router setting is invalid; the message names it."""


@dataclass(frozen=True)
class RouterConfig(ClusterAccess):
    """The router's settings; the connection ones (etcd, namespace, cluster secret, TLS)
    are ``ClusterAccess``'s. The cluster secret comes from PDSERVE_ROUTER_CLUSTER_SECRET."""

    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000
    policy: str = "least_loaded"
    prefix_blocks: int = 8
    overload_margin: int = 4
    retry_attempts: int = 3
    suspect_seconds: float = 10.0
    local_prefill_threshold: int = 32
    prefill_candidates: int = 2

    api_key: str = dataclasses.field(default="", repr=False)  # "" = no authentication
    metrics_require_key: bool = False
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 4096  # chat requests without max_tokens; 0 = the rest of the context
    max_tokens_cap: int = 0  # 0 = no cap but the context length
    max_inflight: int = 1024  # requests served at once; more get 429 (0 = no bound)
    otlp_endpoint: str = ""  # OpenTelemetry spans go to this OTLP gRPC collector; "" = tracing off

    def __post_init__(self) -> None:
        self.check_access(RouterConfigError, "PDSERVE_ROUTER_")
        if self.policy not in POLICIES:
            raise RouterConfigError(f"policy={self.policy!r} is invalid: expected one of {POLICIES}")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise RouterConfigError(f"{name}={getattr(self, name)} is invalid: expected a port in [0, 65535]")
        if self.local_prefill_threshold < 0:
            raise RouterConfigError(f"local_prefill_threshold={self.local_prefill_threshold} is invalid: "
                                    "expected tokens >= 0")
        for name in ("prefix_blocks", "retry_attempts", "prefill_candidates"):
            if getattr(self, name) < 1:
                raise RouterConfigError(f"{name}={getattr(self, name)} is invalid: expected an integer >= 1")
        if self.overload_margin < 0 or self.suspect_seconds < 0:
            raise RouterConfigError("overload_margin and suspect_seconds must be >= 0")
        self._check_request_limits()
        problem = endpoint_problem(self.otlp_endpoint)
        if problem is not None:
            raise RouterConfigError(f"otlp_endpoint={problem}")

    def _check_request_limits(self) -> None:
        if self.max_body_bytes < 1024:
            raise RouterConfigError(f"max_body_bytes={self.max_body_bytes} is invalid: expected bytes >= 1024")
        if self.max_inflight < 0:
            raise RouterConfigError(f"max_inflight={self.max_inflight} is invalid: expected an integer >= 0")
        for name in ("default_max_tokens", "max_tokens_cap"):
            if not 0 <= getattr(self, name) <= 2**31 - 1:
                raise RouterConfigError(f"{name}={getattr(self, name)} is invalid: expected tokens in "
                                        "[0, 2147483647] (0 = no limit but the context length)")
        if self.metrics_require_key and not self.api_key:
            raise RouterConfigError("metrics_require_key needs an API key: pass --api-key (or PDSERVE_ROUTER_API_KEY)")
        if self.api_key != self.api_key.strip() or not self.api_key.isprintable() or not self.api_key.isascii():
            raise RouterConfigError("api_key is invalid: expected printable ASCII without surrounding spaces")

    @classmethod
    def build(cls, flags: Mapping[str, Any], environ: Mapping[str, str], prefix: str = "PDSERVE_ROUTER_") -> "RouterConfig":
        """Merge env < flags (``None`` flags are "not given"), converting strings to field types."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: environ[f"{prefix}{k.upper()}"] for k in fields if f"{prefix}{k.upper()}" in environ}
        values.update({k: v for k, v in flags.items() if v is not None})
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise RouterConfigError(f"unknown router settings {unknown}")
        return cls(**{k: _convert(k, fields[k], v) for k, v in values.items()})


def _convert(name: str, kind: str, value: Any) -> Any:
    if not isinstance(value, str) or kind == "str":
        return value
    if kind == "bool":
        if value.strip().lower() not in _BOOLS:
            raise RouterConfigError(f"{name}={value!r} is invalid: expected one of {sorted(_BOOLS)}")
        return _BOOLS[value.strip().lower()]
    try:
        return int(value) if kind == "int" else float(value)
    except ValueError:
        raise RouterConfigError(f"{name}={value!r} is invalid: expected {kind}") from None
