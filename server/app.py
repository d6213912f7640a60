"""Assembles and runs the gRPC server: the typed services, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from onnxserve.server.config import ServerSettings
from onnxserve.server.registry import ModelRegistry
from onnxserve.server.runtime import resolve_device
from onnxserve.server.servicer import InferenceServicer, ModelsServicer

from onnxserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
)


class OnnxServer:
    """A running server: its gRPC server, registry and health state."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1), thread_name_prefix="onnxserve")
        self.registry = ModelRegistry(settings, resolve_device(settings.device), self.executor)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        self.port = 0

    async def start(self) -> int:
        """Loads the repository, then opens the port; returns the port bound."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self.registry.load_repository)
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.registry, self.executor), self.server
        )
        models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(self.registry), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.settings.host}:{self.settings.port}")
        await self.server.start()
        await self._publish_health()
        log.info("serving on %s:%d", self.settings.host, self.port)
        return self.port

    async def _publish_health(self) -> None:
        """Overall and per-service health, plus one entry per model name."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, serving)
        for model in self.registry.models():
            ready = self.registry.get(model.name).state == models_pb2.MODEL_STATE_READY
            await self.health.set(model.name, serving if ready else not_serving)

    async def stop(self) -> None:
        """Turns health NOT_SERVING first so load balancers drain, then lets calls finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        self.executor.shutdown(wait=False, cancel_futures=True)


async def serve(settings: ServerSettings) -> None:
    """Runs until SIGINT or SIGTERM, then shuts down gracefully."""
    server = OnnxServer(settings)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    print(f"onnxserve listening on {settings.host}:{server.port}", flush=True)
    await stopping.wait()
    log.info("shutting down")
    await server.stop()
