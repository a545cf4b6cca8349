"""Building the etcd client of one process from a URL.

NOTE: a process holds at most one gRPC-based etcd client library (their protos
clash); everything in pdserve goes through ``etcd3aio``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable
from urllib.parse import urlparse

import grpc
from etcd3aio import Etcd3Client, EtcdError

from pdserve.cluster.tls import TLSFiles

log = logging.getLogger(__name__)


def parse_endpoints(url: str) -> list[str]:
    """``http://h1:2379,http://h2:2379`` (or bare ``host:port``) -> ``["h1:2379", "h2:2379"]``."""
    endpoints = []
    for part in (p.strip() for p in url.split(",")):
        if not part:
            continue
        parsed = urlparse(part if "://" in part else f"http://{part}")
        if parsed.scheme not in ("http", "https", "") or not parsed.hostname or not parsed.port:
            raise ValueError(f"etcd endpoint {part!r} is invalid: expected http(s)://host:port")
        endpoints.append(f"{parsed.hostname}:{parsed.port}")
    if not endpoints:
        raise ValueError(f"etcd={url!r} is invalid: expected http://host:port")
    return endpoints


async def connect(url: str, tls: TLSFiles = TLSFiles()) -> Etcd3Client:
    """Open (lazily; the first RPC dials) a client for the given endpoint URL(s)."""
    if url.startswith("https://") and not tls.ca:
        raise ValueError(f"etcd={url!r} uses https: pass the CA that signed etcd's certificate (--etcd-ca)")
    client = Etcd3Client(parse_endpoints(url), rpc_max_attempts=2,
                         watch_reconnect_backoff_seconds=0.2, watch_max_reconnect_backoff_seconds=2.0,
                         **tls.etcd_conn_args())
    await client.connect()
    return client


async def retry_until_reachable(start: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Run ``start()`` until it stops failing with etcd connection errors, for up to
    ``timeout`` seconds (etcd may come up after us); ConnectionError after that."""
    deadline, delay = time.monotonic() + timeout, 0.2
    while True:
        try:
            return await start()
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"cannot reach {what} after {timeout:.0f} s: {exc}") from None
            log.warning("waiting for %s: %s", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
