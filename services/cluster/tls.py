"""TLS material for pdserve's gRPC servers, gRPC clients and the etcd client.

Owns: ``TLSFiles`` (paths to a PEM certificate, key and CA bundle, validated and
read once at start) and the credentials built from them. A process with no TLS
files configured uses plaintext, as on a trusted loopback or pod network.

- Server: certificate + key; with a CA it also requires and verifies client
  certificates (mutual TLS).
- Client: verifies the server against the CA; presents its certificate + key
  when given (for mutual TLS).

It also owns the transport settings every pdserve server and channel share
(``new_server``, ``open_channel``): keepalive that both ends agree on and a short
reconnect backoff.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import grpc

from pdserve.cluster.rpc_auth import client_interceptors, server_interceptors


class TLSConfigError(ValueError):
    """A TLS file is missing or only half of a certificate/key pair is given."""


@dataclass(frozen=True)
class TLSFiles:
    cert: str = ""
    key: str = ""
    ca: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise TLSConfigError("TLS needs both a certificate and a key (got only one of them)")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise TLSConfigError(f"TLS {name} file {path!r} does not exist")

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def _read(self, path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    def server_credentials(self) -> grpc.ServerCredentials:
        if not self.cert:
            raise TLSConfigError("a TLS server needs a certificate and key")
        ca = self._read(self.ca)
        return grpc.ssl_server_credentials([(self._read(self.key), self._read(self.cert))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.ca),
                                            private_key=self._read(self.key),
                                            certificate_chain=self._read(self.cert))

    def https_context(self) -> ssl.SSLContext | None:
        """Server-side TLS for an HTTP API (the router's OpenAI API): the certificate and
        key, no client certificates (HTTP clients authenticate with the API key); None
        without a certificate."""
        if not self.cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def etcd_conn_args(self) -> dict[str, bytes]:
        """Keyword arguments for ``etcd3aio.Etcd3Client`` (empty when TLS is off)."""
        if not self.enabled:
            return {}
        args = {"ca_cert": self._read(self.ca)}
        if self.cert:
            args |= {"cert_key": self._read(self.key), "cert_chain": self._read(self.cert)}
        return {k: v for k, v in args.items() if v is not None}


TLS_FIELDS = ("tls_cert", "tls_key", "tls_ca", "etcd_cert", "etcd_key", "etcd_ca")


def add_tls_flags(parser) -> None:
    """The six TLS flags shared by the worker and the router (dest = the config field)."""
    for name in TLS_FIELDS:
        scope = "etcd client" if name.startswith("etcd") else "gRPC server and clients"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"PEM file: {name.split('_')[1]} ({scope})")


def tls_from_config(config) -> tuple[TLSFiles, TLSFiles]:
    """(gRPC TLS, etcd TLS) from a config object carrying the TLS_FIELDS."""
    return (TLSFiles(config.tls_cert, config.tls_key, config.tls_ca),
            TLSFiles(config.etcd_cert, config.etcd_key, config.etcd_ca))


def add_port(server: grpc.aio.Server, address: str, tls: TLSFiles) -> int:
    """Bind address on server, with TLS when configured; returns the bound port."""
    if tls.cert:
        return server.add_secure_port(address, tls.server_credentials())
    return server.add_insecure_port(address)


# Keepalive both ends agree on: a client pings every 10 s, also on a stream that carries
# nothing for minutes (a request queued for KV blocks), and a server accepts pings that
# often (gRPC's default answers them with GOAWAY "too_many_pings" after two). A peer
# that restarted on the same address is dialled again within a second, not after
# gRPC's default backoff of up to two minutes.
CLIENT_KEEPALIVE_MS = 10_000
CLIENT_OPTIONS = (("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 5_000),
                  ("grpc.http2.max_pings_without_data", 0),  # keep checking the peer on a quiet stream
                  ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 1_000))


def server_options(min_ping_interval_ms: int = CLIENT_KEEPALIVE_MS // 2) -> list[tuple[str, object]]:
    return [("grpc.so_reuseport", 0), ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_ping_strikes", 0)]


def new_server(min_ping_interval_ms: int = CLIENT_KEEPALIVE_MS // 2, token: str = "") -> grpc.aio.Server:
    """A grpc.aio server of pdserve (workers, router) that tolerates its clients' keepalive;
    with a cluster ``token``, Worker RPCs require it (``rpc_auth``)."""
    return grpc.aio.server(options=server_options(min_ping_interval_ms), interceptors=server_interceptors(token))


def open_channel(address: str, tls: TLSFiles, options: list[tuple[str, object]] | None = None,
                 token: str = "") -> grpc.aio.Channel:
    """A channel with pdserve's keepalive and reconnect settings (``options`` override them),
    sending the cluster ``token`` on every call when given."""
    merged = list({k: v for k, v in [*CLIENT_OPTIONS, *(options or [])]}.items())
    interceptors = client_interceptors(token)
    if tls.enabled:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=merged, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=merged, interceptors=interceptors)
