"""The gRPC servicers: thin maps from messages to pipelines and back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from onnxserve.server.errors import ServingError
from onnxserve.server.models.loading import LoadedModel
from onnxserve.server.models.registry import ModelRegistry
from onnxserve.server.tasks import tokenizer_rpcs
from onnxserve.server.tasks.base import EncoderPipeline, Timings
from onnxserve.server.tasks.feature_extraction import model_pooling
from onnxserve.server.tasks.generation import pipeline as generation_pipeline
from onnxserve.server.tasks.generation.pipeline import GenerationPipeline

from onnxserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

log = logging.getLogger(__name__)
# Percent-encoded, a byte of a status message takes up to 3 in the header.
MAX_DETAILS_BYTES = 2048
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _bounded(message: str) -> str:
    """A status message cut to MAX_DETAILS_BYTES. Messages quote the caller's input, and gRPC
    sends them in a header that clients refuse past 8 KiB, which would hide the real status
    behind a RESOURCE_EXHAUSTED about metadata."""
    data = message.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return message
    return data[:MAX_DETAILS_BYTES].decode(errors="ignore") + " [...]"


async def _abort_for(error: Exception, rpc: str, context: grpc.aio.ServicerContext) -> None:
    if isinstance(error, ServingError):
        await context.abort(error.code, _bounded(str(error)))
    log.exception("%s failed", rpc)
    await context.abort(grpc.StatusCode.INTERNAL, _bounded(f"{rpc} failed: {type(error).__name__}: {error}"))


def guarded(handler: Handler) -> Handler:
    """Answers a ServingError with its status, and anything unexpected with INTERNAL and words."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Message, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as error:
            await _abort_for(error, handler.__name__, context)

    return wrapper  # type: ignore[return-value]


def guarded_stream(handler: Callable[..., AsyncIterator[Message]]) -> Callable[..., AsyncIterator[Message]]:
    """`guarded` for server-streaming handlers."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        try:
            async for message in handler(self, request, context):
                yield message
        except Exception as error:
            await _abort_for(error, handler.__name__, context)

    return wrapper


def fill_metadata(metadata: common_pb2.Metadata, model: LoadedModel, timings: Timings, started_ns: int) -> None:
    metadata.model = model.name
    metadata.version = model.version
    metadata.tokens = timings.tokens
    metadata.tokenization_ns = timings.tokenization_ns
    metadata.queue_ns = timings.queue_ns
    metadata.inference_ns = timings.inference_ns
    metadata.postprocess_ns = timings.postprocess_ns
    metadata.batch_size = timings.batch_size
    metadata.precision = model.precision
    metadata.execution_provider = model.execution_provider
    metadata.total_ns = time.perf_counter_ns() - started_ns


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, executor: Executor, generation_executor: Executor) -> None:
        self.registry = registry
        self.executor = executor
        self.generation_executor = generation_executor

    async def _blocking(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    async def _generating(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.generation_executor, work)

    async def _run_encoder(self, rpc: str, request: Any, context: grpc.aio.ServicerContext) -> Message:
        """preprocess -> forward (batched) -> postprocess, for the encoder pipelines."""
        started = time.perf_counter_ns()
        model = self.registry.resolve(request.model, request.version)
        pipeline: EncoderPipeline = model.pipeline_for(rpc)  # type: ignore[assignment]
        timings = Timings()
        prepared = await self._blocking(lambda: timings.timed("tokenization", lambda: pipeline.preprocess(request)))
        timings.tokens = sum(len(s.ids) for s in prepared.sequences)
        # The time left lets the batcher drop the request if its deadline passes in the queue.
        outputs = await model.runner.infer(prepared.sequences, timings, context.time_remaining())
        response = await self._blocking(
            lambda: timings.timed("postprocess", lambda: pipeline.postprocess(request, prepared, outputs))
        )
        fill_metadata(response.metadata, model, timings, started)
        return response

    @guarded
    async def Encode(self, request: inference_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_encoder("Encode", request, context)

    @guarded
    async def Classify(self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_encoder("Classify", request, context)

    @guarded
    async def TagTokens(self, request: inference_pb2.TagTokensRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_encoder("TagTokens", request, context)

    @guarded
    async def Answer(self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_encoder("Answer", request, context)

    @guarded
    async def FillMask(self, request: inference_pb2.FillMaskRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_encoder("FillMask", request, context)

    @guarded
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Message:
        started = time.perf_counter_ns()
        model = self.registry.resolve(request.model, request.version)
        pipeline: GenerationPipeline = model.pipeline_for("Generate")  # type: ignore[assignment]
        timings = Timings()
        generation = await self._generating(lambda: pipeline.start(request.prompts, request.parameters, timings))
        response = await generation_pipeline.run(generation, self.generation_executor)
        fill_metadata(response.metadata, model, timings, started)
        return response

    @guarded_stream
    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        started = time.perf_counter_ns()
        model = self.registry.resolve(request.model, request.version)
        pipeline: GenerationPipeline = model.pipeline_for("GenerateStream")  # type: ignore[assignment]
        timings = Timings()
        generation = await self._generating(lambda: pipeline.start([request.prompt], request.parameters, timings))
        async for message in generation_pipeline.stream(generation, self.generation_executor):
            if message.finish_reason:
                fill_metadata(message.metadata, model, timings, started)
            yield message

    async def _run_tokenizer(self, request: Any, work: Callable[..., Message]) -> Message:
        started = time.perf_counter_ns()
        model = self.registry.resolve(request.model, request.version)
        timings = Timings()
        response = await self._blocking(lambda: work(model.tokenizer, request, timings))
        fill_metadata(response.metadata, model, timings, started)
        return response

    @guarded
    async def Tokenize(self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run_tokenizer(request, tokenizer_rpcs.tokenize)

    @guarded
    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run_tokenizer(request, tokenizer_rpcs.detokenize)


def model_info(model: LoadedModel, versions: list[int]) -> models_pb2.ModelInfo:
    info = models_pb2.ModelInfo(
        name=model.name,
        version=model.version,
        versions=versions,
        task=model.task,
        precision=model.precision,
        execution_provider=model.execution_provider,
        state=model.state,
        state_reason=model.reason,
        max_batch_size=model.settings.max_batch_size,
        max_batch_tokens=model.settings.max_batch_tokens,
    )
    manifest = model.manifest
    if manifest is not None:
        info.labels.extend(manifest.labels)
        info.available_precisions.extend(v.precision for v in manifest.variants)
        info.max_input_length = manifest.max_length
        info.pooling = model_pooling(manifest)
        info.hidden_size = manifest.hidden_size
        info.mask_token = manifest.special_tokens.mask_token
        info.architecture = manifest.architecture
    return info


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def _versions(self, name: str) -> list[int]:
        return [m.version for m in self.registry.models() if m.name == name]

    @guarded
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        models = self.registry.models()
        return models_pb2.ListModelsResponse(models=[model_info(m, self._versions(m.name)) for m in models])

    @guarded
    async def GetModel(self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.get(request.model, request.version)
        return model_info(model, self._versions(model.name))
