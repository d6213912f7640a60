"""The typed onnxserve.v1 services: each method resolves the model and hands the request to its
execution path (models/loaded.py); errors become statuses in the ErrorStatus interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from onnxserve.server.models.loaded import LoadedModel
from onnxserve.server.models.registry import ModelRegistry
from onnxserve.server.runtime.machine import this_machine
from onnxserve.server.tasks.feature_extraction import model_pooling

from onnxserve.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def _run(self, rpc: str, request: Message, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.resolve(request.model, request.version)
        return await model.run(rpc, request, context.time_remaining())

    async def Encode(self, request: inference_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Encode", request, context)

    async def Classify(self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Classify", request, context)

    async def TagTokens(self, request: inference_pb2.TagTokensRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("TagTokens", request, context)

    async def Answer(self, request: inference_pb2.AnswerRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Answer", request, context)

    async def FillMask(self, request: inference_pb2.FillMaskRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("FillMask", request, context)

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Generate", request, context)

    async def GenerateStream(
        self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        async for message in self._stream("GenerateStream", request, context):
            yield message

    def _stream(self, rpc: str, request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        model = self.registry.resolve(request.model, request.version)
        return model.stream(rpc, request, context.time_remaining())

    async def Tokenize(self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Tokenize", request, context)

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("Detokenize", request, context)

    async def ClassifyImage(
        self, request: inference_pb2.ClassifyImageRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("ClassifyImage", request, context)

    async def DetectObjects(
        self, request: inference_pb2.DetectObjectsRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("DetectObjects", request, context)

    async def SegmentImage(
        self, request: inference_pb2.SegmentImageRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("SegmentImage", request, context)

    async def EncodeImage(
        self, request: inference_pb2.EncodeImageRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("EncodeImage", request, context)

    async def ReconstructImage(
        self, request: inference_pb2.ReconstructImageRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("ReconstructImage", request, context)

    async def CaptionImage(
        self, request: inference_pb2.CaptionImageRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("CaptionImage", request, context)

    async def Transcribe(self, request: inference_pb2.TranscribeRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._run("Transcribe", request, context)

    async def TranscribeStream(
        self, request: inference_pb2.TranscribeStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        async for message in self._stream("TranscribeStream", request, context):
            yield message

    async def ClassifyAudio(
        self, request: inference_pb2.ClassifyAudioRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return await self._run("ClassifyAudio", request, context)


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
        max_inputs_per_request=model.settings.max_inputs_per_request,
        max_response_bytes=model.max_response_bytes,
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
    if model.execution_provider:
        info.serving_machine.CopyFrom(this_machine(model.execution_provider))
    if model.load_check is not None:
        info.load_check.CopyFrom(model.load_check)
    info.refused_variants.extend(model.refused_variants)
    return info


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def _versions(self, name: str) -> list[int]:
        return [m.version for m in self.registry.models() if m.name == name]

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        models = self.registry.models()
        return models_pb2.ListModelsResponse(models=[model_info(m, self._versions(m.name)) for m in models])

    async def GetModel(self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.get(request.model, request.version)
        return model_info(model, self._versions(model.name))
