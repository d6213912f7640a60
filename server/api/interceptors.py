"""What the server interceptors share (rewrapping a handler's behavior), the concurrency limit, and
the mapping of errors to statuses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from onnxserve.server.errors import ServingError

log = logging.getLogger(__name__)

# Load balancers and orchestrators probe health without credentials, and must get an answer
# however busy the server is.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]
# Percent-encoded, a byte of a status message takes up to 3 in the header.
MAX_DETAILS_BYTES = 2048


def replace_behavior(handler: grpc.RpcMethodHandler, wrap: Callable[[str, Callable], Callable]) -> Any:
    """The handler with its behavior (whichever of the four call kinds it is) passed through
    `wrap(kind, behavior)`. Handlers are namedtuples, so the rest is kept as is."""
    kind = next(k for k in KINDS if getattr(handler, k) is not None)
    return handler._replace(**{kind: wrap(kind, getattr(handler, kind))})


class Call:
    """What `around` sees of a call: its response, once there is one (a stream's last message)."""

    response: Any = None


Around = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[Call]]


def wrap_calls(handler: grpc.RpcMethodHandler, around: Around) -> Any:
    """The handler with each call that takes one request run inside `around(request, context)`.
    Calls that stream requests (reflection) are left as they are."""

    def wrap(kind: str, behavior: Callable) -> Callable:
        if kind == "unary_unary":

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with around(request, context) as call:
                    call.response = await behavior(request, context)
                    return call.response

            return unary
        if kind == "unary_stream":

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with around(request, context) as call:
                    async for call.response in behavior(request, context):
                        yield call.response

            return stream
        return behavior

    return replace_behavior(handler, wrap)


class ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """Refuses a call at once with RESOURCE_EXHAUSTED while `limit` calls are in progress, all
    models together, so that overload is shed before any work (parsing, tokenizing) is spent on
    it. Coming after the telemetry interceptor, the refusals are counted and logged like any call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.asynccontextmanager
    async def _slot(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        if self.active >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is working on {self.active} calls, its max_concurrent_calls; retry later",
            )
        self.active += 1
        try:
            yield Call()
        finally:
            self.active -= 1

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        return wrap_calls(handler, self._slot)


def bounded(message: str) -> str:
    """A status message cut to MAX_DETAILS_BYTES. Messages quote the caller's input, and gRPC
    sends them in a header that clients refuse past 8 KiB, which would hide the real status
    behind a RESOURCE_EXHAUSTED about metadata."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return data[:MAX_DETAILS_BYTES].decode(errors="ignore") + " [...]"


class ErrorStatus(grpc.aio.ServerInterceptor):
    """Answers a handler's ServingError with its status and message, and anything unexpected with
    INTERNAL and words (logged with its traceback), for every service: the servicers only raise.
    Innermost, so that the telemetry interceptor sees the status it sets."""

    @staticmethod
    @contextlib.asynccontextmanager
    async def _mapped(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[Call]:
        try:
            yield Call()
        except grpc.aio.AbortError:
            raise  # the handler set its status itself
        except ServingError as error:
            await context.abort(error.code, bounded(str(error)))
        except Exception as error:
            log.exception("%s failed", method)
            rpc = method.rsplit("/", 1)[-1]
            await context.abort(grpc.StatusCode.INTERNAL, bounded(f"{rpc} failed: {type(error).__name__}: {error}"))

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        return wrap_calls(handler, lambda request, context: self._mapped(details.method, context))
