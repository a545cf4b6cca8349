"""Authentication of pdserve's internal RPCs (the ``pdserve.v1.Worker`` service) with the cluster secret.

Owns the bearer token derived from the cluster secret, the server interceptor that
checks it on every Worker call, and the client interceptors that attach it. The
token is an HMAC of the secret, not the secret itself, so a token seen on a
plaintext network does not let anyone sign remote-prefill orders
(``pdserve.cluster.orders``). grpc health and reflection stay open (probes).

Lifecycle: built once per process from its config (``token_for(secret)``; "" when
the cluster has no secret, and then nothing is checked or attached) and handed to
``new_server`` / ``open_channel``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

log = logging.getLogger(__name__)
WORKER_METHODS = "/pdserve.v1.Worker/"


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``authorization`` value (HTTP header or gRPC metadata) is ``Bearer <token>``,
    compared in constant time; the scheme is case-insensitive, as in HTTP."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                               token.encode("utf-8"))


def token_for(secret: str) -> str:
    """The bearer token of a cluster secret ("" for none)."""
    return hmac.new(secret.encode(), b"pdserve worker rpc v1", hashlib.sha256).hexdigest() if secret else ""


class RequireToken(grpc.aio.ServerInterceptor):
    """Refuses Worker calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(WORKER_METHODS):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and bearer_matches(given, self._token):
            return handler
        log.warning("refused %s: %s cluster token", details.method, "a wrong" if given else "no")
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "internal RPC without the cluster's token: this worker accepts calls from its cluster only"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {token}"))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# NOTE: grpc.aio files an interceptor under its first matching kind only: one class per kind.
class _UnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _StreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


def client_interceptors(token: str) -> list[Any]:
    return [_UnaryToken(token), _StreamToken(token)] if token else []


def server_interceptors(token: str) -> list[Any]:
    return [RequireToken(token)] if token else []
