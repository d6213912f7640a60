"""The telemetry interceptor: every call gets a request id (the caller's x-request-id, or a new
one) that tags its log records and comes back in the trailing metadata, is counted and timed in
the metrics, and leaves an access-log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from onnxserve.server.logs import REQUEST_ID
from onnxserve.server.metrics import NO_MODEL, Metrics
from onnxserve.server.security import replace_behavior

REQUEST_ID_KEY = "x-request-id"
# A caller's id ends up in logs, so only short, plain ones are taken as they are.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("onnxserve.access")


def request_id(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


@dataclass
class _Call:
    rpc: str
    model: str
    response: Any = None


def _status(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if code is not None:
        return code.name
    if failed is None:
        return "OK"
    if isinstance(failed, asyncio.CancelledError):
        # grpc cancels the handler both when the caller cancels and when its deadline passes.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"  # what grpc answers for an exception that is not an abort


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None, is_model: Callable[[str], bool]) -> None:
        self.metrics = metrics
        # Only names of models the server holds become label values: callers choose the names,
        # and unbounded label values would grow the metrics without limit.
        self.is_model = is_model

    def _model(self, request: Any) -> str:
        name = getattr(request, "model", None) or getattr(request, "model_name", None)
        return name if isinstance(name, str) and self.is_model(name) else NO_MODEL

    @contextlib.contextmanager
    def _observed(self, rpc: str, call_id: str, request: Any, context: grpc.aio.ServicerContext) -> Iterator[_Call]:
        REQUEST_ID.set(call_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call_id),))
        call = _Call(rpc, self._model(request))
        started = time.perf_counter()
        failed: BaseException | None = None
        try:
            yield call
        except BaseException as error:
            failed = error
            raise
        finally:
            self._record(call, _status(context, failed), time.perf_counter() - started)

    def _record(self, call: _Call, code: str, seconds: float) -> None:
        metadata = getattr(call.response, "metadata", None)
        if self.metrics is not None:
            self.metrics.observe_call(call.model, call.rpc, code, seconds, metadata)
        access_log.debug(
            "%s %s %s %.1f ms", call.rpc, call.model or "-", code, seconds * 1e3,
            extra={"rpc": call.rpc, "model": call.model, "code": code, "duration_ms": round(seconds * 1e3, 3)},
        )

    def _wrap(self, rpc: str, call_id: str, kind: str, behavior: Callable) -> Callable:
        if kind == "unary_unary":

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with self._observed(rpc, call_id, request, context) as call:
                    call.response = await behavior(request, context)
                    return call.response

            return unary
        if kind == "unary_stream":

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._observed(rpc, call_id, request, context) as call:
                    async for call.response in behavior(request, context):
                        yield call.response

            return stream
        return behavior  # client streaming (reflection): no model, nothing worth timing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        rpc = details.method.lstrip("/")
        call_id = request_id(details.invocation_metadata)
        return replace_behavior(handler, lambda kind, behavior: self._wrap(rpc, call_id, kind, behavior))
