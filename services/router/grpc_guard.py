"""What runs before every call of the ``pdserve.v1.Router`` gRPC service.

Owns the service's method handlers (built from the proto descriptor, in place of
the generated ``add_RouterServicer_to_server``), each guarded in this order:

1. the API key (``authorization: Bearer <key>`` metadata) -> UNAUTHENTICATED;
2. the request bytes: a message that does not parse -> INVALID_ARGUMENT (grpc's own
   deserialization would answer UNKNOWN), so the deserializer never raises and
   hands the handler a ``Malformed`` marker instead.

grpc health and reflection are separate services and stay open.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf import message_factory
from pdserve.v1 import router_pb2

from pdserve.router.auth import ApiKey, unauthorized

SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"]


@dataclass(frozen=True)
class Malformed:
    """Request bytes that are not a valid message of the method's request type."""

    type_name: str
    error: str


def router_handlers(servicer: Any, api_key: ApiKey) -> dict[str, grpc.RpcMethodHandler]:
    """Method name -> guarded handler, for every method of the Router service."""
    return {m.name: _handler(m, getattr(servicer, m.name), api_key) for m in SERVICE.methods}


def add_router_service(server: grpc.aio.Server, servicer: Any, api_key: ApiKey) -> None:
    handlers = router_handlers(servicer, api_key)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _handler(method: Any, behavior: Callable, api_key: ApiKey) -> grpc.RpcMethodHandler:
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    guard = _Guard(api_key, method.input_type.full_name)
    kwargs = {"request_deserializer": _lenient(request_type.FromString, method.input_type.full_name),
              "response_serializer": response_type.SerializeToString}
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(_streaming(behavior, guard), **kwargs)
    return grpc.unary_unary_rpc_method_handler(_unary(behavior, guard), **kwargs)


def _lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - any bytes that do not parse are the client's fault
            return Malformed(type_name, str(exc) or type(exc).__name__)
    return deserialize


@dataclass(frozen=True)
class _Guard:
    api_key: ApiKey
    type_name: str

    async def check(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Aborts the call (raises) when the key is missing or wrong, or the request did not parse."""
        if self.api_key.enabled:
            authorization = dict(context.invocation_metadata() or ()).get("authorization")
            if not self.api_key.allows(authorization):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, unauthorized(authorization).message)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {self.type_name} message: {request.error}")


def _unary(behavior: Callable, guard: _Guard) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await guard.check(request, context)
        return await behavior(request, context)
    return handle


def _streaming(behavior: Callable, guard: _Guard) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await guard.check(request, context)
        async for response in behavior(request, context):
            yield response
    return handle
