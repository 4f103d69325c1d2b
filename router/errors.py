"""Every servicer method's exceptions become gRPC statuses here, and nowhere else."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from workers.validation import InvalidRequestError

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Admission is full: RESOURCE_EXHAUSTED, at once."""


class NoHealthyWorker(Exception):
    """No worker can take the request: UNAVAILABLE."""


class WorkerUnavailable(Exception):
    """This worker cannot serve the request now (its engine failed and restarts), another may: UNAVAILABLE, so
    the router moves the stream on."""


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (NoHealthyWorker, WorkerUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, grpc.aio.AioRpcError):  # a worker's status passes through
        return error.code(), error.details() or ""
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def abort_with_status(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End the call with ``error``'s status (the interceptors' refusals go through here too)."""
    code, details = _status_of(error)
    await context.abort(code, details)


def map_errors(method):
    """Decorate a grpc.aio servicer method (unary or server-streaming) so exceptions become statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - mapped, not swallowed: the client gets the status
                await abort_with_status(context, error)

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped, not swallowed: the client gets the status
            await abort_with_status(context, error)

    return unary
