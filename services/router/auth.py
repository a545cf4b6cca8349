"""The router's API key (``--api-key``): who may call it, for both APIs.

Owns: parsing ``Authorization: Bearer <key>`` (an HTTP header, or the gRPC
metadata ``authorization``), the constant-time comparison with the configured key
(``pdserve.cluster.rpc_auth.bearer_matches``), which HTTP paths are protected, and the 401 error.
With no key configured every request is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.cluster.rpc_auth import bearer_matches
from pdserve.router.errors import RequestError


@dataclass(frozen=True)
class ApiKey:
    key: str = ""  # "" = no key: everything is open
    protect_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value carries the key (always, when no key is set)."""
        return not self.key or bearer_matches(authorization, self.key)

    def protects(self, path: str) -> bool:
        """HTTP paths behind the key: the OpenAI API and /workers, and /metrics when asked; never /health."""
        if not self.key:
            return False
        return path.startswith("/v1/") or path == "/v1" or path == "/workers" or (
            self.protect_metrics and path == "/metrics")


def unauthorized(authorization: str | None) -> RequestError:
    why = "no API key given" if not authorization else "the API key is not valid"
    return RequestError(f"{why}: send 'Authorization: Bearer <key>' (an HTTP header, or the gRPC metadata "
                        "'authorization') with this router's API key", 401, None, "invalid_api_key")
