"""The telemetry interceptor: every call gets a request id (the caller's x-request-id, or a new
one) that tags its log records and comes back in the trailing metadata, is counted and timed in
the metrics, and leaves an access-log entry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from onnxserve.server.api.interceptors import Call, Continuation, wrap_calls
from onnxserve.server.observability.logs import REQUEST_ID
from onnxserve.server.observability.metrics import NO_MODEL, Metrics

REQUEST_ID_KEY = "x-request-id"
# A caller's id ends up in logs, so only short, plain ones are taken as they are.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
access_log = logging.getLogger("onnxserve.access")
MODEL_FIELDS = ("model", "model_name", "name")


def request_id(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


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
        """The model a request names: `model` here, `model_name` or `name` in KServe's messages."""
        name = next((getattr(request, f) for f in MODEL_FIELDS if getattr(request, f, "")), "")
        return name if isinstance(name, str) and self.is_model(name) else NO_MODEL

    @contextlib.asynccontextmanager
    async def _observed(
        self, rpc: str, call_id: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Call]:
        REQUEST_ID.set(call_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, call_id),))
        call = Call()
        started = time.perf_counter()
        failed: BaseException | None = None
        try:
            yield call
        except BaseException as error:
            failed = error
            raise
        finally:
            self._record(rpc, self._model(request), _status(context, failed), time.perf_counter() - started, call)

    def _record(self, rpc: str, model: str, code: str, seconds: float, call: Call) -> None:
        if self.metrics is not None:
            self.metrics.observe_call(model, rpc, code, seconds, getattr(call.response, "metadata", None))
        access_log.debug(
            "%s %s %s %.1f ms", rpc, model or "-", code, seconds * 1e3,
            extra={"rpc": rpc, "model": model, "code": code, "duration_ms": round(seconds * 1e3, 3)},
        )

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        rpc, call_id = details.method.lstrip("/"), request_id(details.invocation_metadata)
        return wrap_calls(handler, lambda request, context: self._observed(rpc, call_id, request, context))
