"""Assembles and runs the gRPC server: the typed services, health and reflection, the model
lifecycle, metrics, TLS and auth; and the graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from onnxserve.server.api.interceptors import ConcurrencyLimit, ErrorStatus
from onnxserve.server.api.kserve import servicer as kserve
from onnxserve.server.api.security import TokenAuthInterceptor, server_credentials
from onnxserve.server.api.typed import InferenceServicer, ModelsServicer
from onnxserve.server.config.settings import ServerSettings
from onnxserve.server.models.lifecycle import ModelLifecycle
from onnxserve.server.models.loaded import LoadedModel
from onnxserve.server.models.registry import ModelRegistry
from onnxserve.server.observability.logs import announce
from onnxserve.server.observability.metrics import Metrics
from onnxserve.server.observability.telemetry import TelemetryInterceptor
from onnxserve.server.tasks.base import Executors

from onnxserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
    kserve.SERVICE_NAME,
)
# Health entries that report the process, not the models' readiness.
LIVENESS_NAMES = ("", models_pb2.DESCRIPTOR.services_by_name["Models"].full_name)


def channel_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Message size limits (gRPC answers RESOURCE_EXHAUSTED past them, naming both sizes) and
    the connection age of gRPC A9, which makes clients reconnect and so spread over new replicas."""
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
        ("grpc.max_send_message_length", settings.max_send_message_bytes),
    ]
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
    if settings.max_connection_age_grace_s > 0:
        options.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)))
    return options


class OnnxServer:
    """A running server: its gRPC server, registry, model lifecycle, metrics and health state."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        # One request at a time per executor thread: its tokenizer need not fan out (Rust threads
        # would only fight the intra-op threads of ONNX Runtime).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.executor = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="onnxserve")
        # Generation steps get threads of their own, so that however many generations run (or a
        # long prefill), encoder calls still get theirs for tokenizing; encoder runs have a
        # thread per model (runtime/batching.py).
        self.generation_executor = ThreadPoolExecutor(
            max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="onnxserve-generation"
        )
        self.executors = Executors(tokenizing=self.executor, generation=self.generation_executor)
        self.registry = ModelRegistry(settings.required_models)
        self.metrics = Metrics(self.registry.models) if settings.metrics_port is not None else None
        self.lifecycle = ModelLifecycle(
            settings, self.registry, self.executors, on_change=self._publish_health, on_ready=self._observe_runs
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._published: set[str] = set()

    async def start(self) -> int:
        """Loads the repository, then opens the port; returns the port bound."""
        await self.lifecycle.sync()
        # Made here, not in __init__: a grpc.aio server belongs to the loop it was created on.
        self.server = self._grpc_server()
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.registry), self.server)
        models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(self.registry), self.server)
        kserve.add_to_server(self.registry, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind(self.server)
        await self.server.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        await self._publish_health()
        self.lifecycle.start_polling()
        log.info("serving on %s:%d", self.settings.host, self.port)
        return self.port

    def _grpc_server(self) -> grpc.aio.Server:
        interceptors: list[grpc.aio.ServerInterceptor] = [TelemetryInterceptor(self.metrics, self.registry.holds)]
        if self.settings.auth_tokens:
            interceptors.append(TokenAuthInterceptor(self.settings.auth_tokens))
        if self.settings.max_concurrent_calls:
            interceptors.append(ConcurrencyLimit(self.settings.max_concurrent_calls))
        interceptors.append(ErrorStatus())  # innermost: the others see the status it sets
        return grpc.aio.server(interceptors=interceptors, options=channel_options(self.settings))

    def _bind(self, server: grpc.aio.Server) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot bind {address}")
        return port

    def _observe_runs(self, model: LoadedModel) -> None:
        if self.metrics is not None and model.pipeline is not None:
            model.pipeline.observe_runs(functools.partial(self.metrics.observe_batch, model.name))

    async def _publish_health(self) -> None:
        """Health per service and per model name. The overall entry ("") and the Models service
        are SERVING while the process runs (liveness: restarting would not mend a bad model, and
        Models is how its reason is read). The inference services are readiness: SERVING only
        while the registry is ready (every required model READY), so that a replica whose models
        failed leaves its Service's endpoints instead of answering UNAVAILABLE."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.registry.ready()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, serving if ready or name in LIVENESS_NAMES else not_serving)
        names = self.registry.names()
        for name in self._published - names:  # unloaded
            await self.health.set(name, not_serving)
        for name in names:
            ready = self.registry.get(name).state == models_pb2.MODEL_STATE_READY
            await self.health.set(name, serving if ready else not_serving)
        self._published = names

    async def stop(self) -> None:
        """Turns health NOT_SERVING first, so that load balancers move traffic away (for
        drain_delay_s, while calls are still taken); then refuses new calls and gives those in
        flight shutdown_grace_s to finish before cancelling them."""
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.drain_delay_s)
        log.info("drained: refusing new calls")
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        await self.lifecycle.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.generation_executor.shutdown(wait=False, cancel_futures=True)


async def serve(settings: ServerSettings) -> None:
    """Runs until SIGINT or SIGTERM, then shuts down gracefully."""
    server = OnnxServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda name=signum.name: received.done() or received.set_result(name))
    metrics = f"; metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics" if server.metrics else ""
    announce(
        f"onnxserve listening on {settings.host}:{server.port}{metrics}", settings.log_format,
        host=settings.host, port=server.port, metrics_port=server.metrics_port,
    )
    signal_name = await received
    log.info(
        "%s received: health NOT_SERVING; answering for drain_delay_s (%.0f s), then finishing the calls in "
        "flight (at most %.0f s)", signal_name, settings.drain_delay_s, settings.shutdown_grace_s,
    )
    await server.stop()
    log.info("stopped")
