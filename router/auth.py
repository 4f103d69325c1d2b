"""Bearer-token auth for the router's gRPC endpoint, as one server interceptor.

Every call except the health and reflection services must carry ``authorization: Bearer <token>``; one
without a known token ends ``UNAUTHENTICATED`` before any servicer code runs. A ``Generate`` or ``FlushCache``
call's cache salt is replaced by its tenant's (``router.tenancy.tenant_salt``), so the servicer, the workers
and every KV tier only ever see salts the server derived: two tenants' identical prompts never share a block
anywhere, and a tenant's flush drops only its own blocks: with a cache salt, that salt's; without one, every
block of the tenant (its scope, ``router.tenancy.tenant_scope``), whatever salts its requests gave. A tenant's
own limits from the tokens file (``router.tenancy.TenantLimits``) are enforced here too: a ``Generate`` more
urgent than its ``min_priority`` is refused ``INVALID_ARGUMENT``, and one beyond its ``max_in_flight`` calls
at once ``RESOURCE_EXHAUSTED``, so no tenant can preempt or crowd out the others on a shared cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from protos.kvtier.v1 import generation_pb2 as pb
from router.errors import Overloaded, abort_with_status
from router.tenancy import TenantLimits, TokenTable, tenant_salt, tenant_scope
from workers.validation import InvalidRequestError

GENERATE_METHOD = "/kvtier.v1.Generation/Generate"
FLUSH_METHOD = "/kvtier.v1.Generation/FlushCache"
_OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                  "grpc.reflection.v1.ServerReflection")


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenTable, on_refused: Callable[[], None] | None = None) -> None:
        """``on_refused`` is called for each call a tenant's limits refuse (the router counts it as rejected)."""
        self.tokens = tokens
        self.on_refused = on_refused
        self.in_flight: dict[str, int] = dict.fromkeys(tokens.tenants, 0)  # Generate calls per tenant

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        service = details.method.rsplit("/", 2)[-2] if details.method.count("/") >= 2 else ""
        if service in _OPEN_SERVICES:
            return await continuation(details)
        tenant = self.tokens.tenant_of(bearer_token(details.invocation_metadata))
        handler = await continuation(details)
        if handler is None:
            return None
        if tenant is None:
            return _refusing(handler)
        if details.method == GENERATE_METHOD:
            return self._generating_as(handler, tenant)
        if details.method == FLUSH_METHOD:
            return _flushing_tenant_salt(handler, tenant)
        return handler

    def _generating_as(self, handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
        """Generate (unary-stream) within the tenant's limits, counted while it streams, with the request's cache
        salt replaced by the tenant's."""
        generate, limits = handler.unary_stream, self.tokens.limits_of(tenant)

        async def salted(request: pb.GenerateRequest, context):
            try:
                _check_limits(request, tenant, limits, self.in_flight[tenant])
            except (InvalidRequestError, Overloaded) as error:
                if self.on_refused is not None:
                    self.on_refused()
                await abort_with_status(context, error)
            _salt_for(request, tenant)
            self.in_flight[tenant] += 1
            try:
                async for response in generate(request, context):
                    yield response
            finally:
                self.in_flight[tenant] -= 1

        return grpc.unary_stream_rpc_method_handler(salted, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _check_limits(request: pb.GenerateRequest, tenant: str, limits: TenantLimits, in_flight: int) -> None:
    if limits.min_priority is not None and request.priority < limits.min_priority:
        raise InvalidRequestError("priority", f"{request.priority} is more urgent than tenant {tenant!r} may ask "
                                              f"for (its min_priority: {limits.min_priority})")
    if limits.max_in_flight is not None and in_flight >= limits.max_in_flight:
        raise Overloaded(f"tenant {tenant!r} has {in_flight} requests in flight, its limit is {limits.max_in_flight}")


def _flushing_tenant_salt(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """FlushCache (unary-unary) of the tenant's own blocks only: it can never delete another tenant's."""
    flush = handler.unary_unary

    async def salted(request: pb.FlushCacheRequest, context):
        if request.HasField("cache_salt"):
            _salt_for(request, tenant)
            request.ClearField("salt_scope")
        else:
            request.salt_scope = tenant_scope(tenant)
        return await flush(request, context)

    return grpc.unary_unary_rpc_method_handler(salted, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


def _salt_for(request: pb.GenerateRequest | pb.FlushCacheRequest, tenant: str) -> None:
    """The request's cache salt (or none) replaced by the tenant's derived one."""
    client_salt = request.cache_salt if request.HasField("cache_salt") else None
    request.cache_salt = tenant_salt(tenant, client_salt)
