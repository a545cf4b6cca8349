"""How a process of the cluster reaches etcd and the workers: the connection settings the
router and every worker share.

Owns ``ClusterAccess``, the frozen base of ``RouterConfig`` and ``WorkerConfig`` that
declares (once) the etcd endpoint, the key namespace, the cluster secret and the TLS
files of gRPC and etcd, with their validation. Built at the edge with the rest of a
process's configuration (flags, ``PDSERVE_*`` environment, YAML) and never changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.cluster.tls import TLSConfigError, TLSFiles, tls_from_config


@dataclass(frozen=True, kw_only=True)
class ClusterAccess:
    etcd: str = ""
    namespace: str = "default"
    # Shared by the processes of one cluster: workers sign remote-prefill orders with it
    # (pdserve.cluster.orders) and every Worker RPC carries a token derived from it
    # (pdserve.cluster.rpc_auth). Empty: unsigned, unauthenticated.
    cluster_secret: str = field(default="", repr=False)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_ca: str = ""

    def check_access(self, error: type[ValueError], env_prefix: str) -> None:
        """Raise ``error`` naming the first invalid connection setting."""
        if not self.etcd:
            raise error(f"etcd is missing: pass --etcd http://host:port (or {env_prefix}ETCD)")
        if not self.namespace or "/" in self.namespace:
            raise error(f"namespace={self.namespace!r} is invalid: expected a name without '/'")
        try:
            tls_from_config(self)
        except TLSConfigError as exc:
            raise error(str(exc)) from None

    @property
    def tls(self) -> tuple[TLSFiles, TLSFiles]:
        """(gRPC TLS, etcd TLS); plaintext when no files are configured."""
        return tls_from_config(self)


__all__ = ["ClusterAccess"]
