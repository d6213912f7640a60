"""The KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`) over the registry, so
that tools built for Triton, KServe and MLServer can call onnxserve.

ModelInfer has two modes. Tensors in, tensors out: the inputs feed the model's ONNX graph as they
are. Text, images or audio in, results out: a BYTES input named `text` (or `image` or `audio`,
encoded files) runs
the model's whole pipeline (tokenize or decode and process -> forward -> postprocess) and the
results come back as tensors (docs/kserve.md)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as GraphRefused
from onnxserve.server.api.kserve.tensors import (
    ORT_DATATYPES,
    datatype_of,
    decode_inputs,
    encode_outputs,
    select_outputs,
)
from onnxserve.server.api.kserve.text import (
    AUDIO_INPUT,
    IMAGE_INPUT,
    TEXT_INPUT,
    build_request,
    response_tensors,
)
from onnxserve.server.errors import InvalidArgument, Unimplemented
from onnxserve.server.models.loaded import LoadedModel
from onnxserve.server.models.registry import ModelRegistry
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.tasks.registration import KServeFiles, KServeText, registration_for, task_name

import onnxserve
from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import models_pb2

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"  # Triton's platform name for ONNX Runtime models
# Overriding the generated base's methods, which raise NotImplementedError (logged as an error,
# answered "Unexpected <class 'NotImplementedError'>").
REPOSITORY_EXTENSION = (
    "the model repository extension (load, unload) is not served: onnxserve serves the latest version "
    "of each model folder in its repository and follows its changes (docs/operations.md, hot reload)"
)


def add_to_server(registry: ModelRegistry, server: grpc.aio.Server) -> None:
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(registry), server)


def parse_version(version: str) -> int:
    """The v2 protocol's string version as the registry's number; empty means the latest (0)."""
    if not version:
        return 0
    if not version.isdigit():
        raise InvalidArgument(f"model version {version!r} is not a whole number")
    return int(version)


def tensor_graph(model: LoadedModel) -> Session:
    session = model.graph
    if session is None:
        raise Unimplemented(
            f"model {model.name!r} ({task_name(model.task)}) has no single ONNX graph in this release to run "
            f"tensors on; send a BYTES input named {TEXT_INPUT!r} where its task maps text (docs/kserve.md)"
        )
    return session


def tensor_metadata(nodes: list[Any]) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    """Graph inputs or outputs as v2 metadata; symbolic dimensions become -1."""
    return [
        v2.ModelMetadataResponse.TensorMetadata(
            name=node.name,
            datatype=ORT_DATATYPES.get(node.type, node.type),
            shape=[size if isinstance(size, int) else -1 for size in node.shape],
        )
        for node in nodes
    ]


def check_feeds(model: str, session: Session, arrays: dict[str, np.ndarray]) -> None:
    """Refuses inputs the graph does not declare, lacks, or would take with another type or rank."""
    declared = {node.name: node for node in session.session.get_inputs()}
    unknown = sorted(set(arrays) - set(declared))
    missing = [name for name in declared if name not in arrays]
    if unknown or missing:
        raise InvalidArgument(
            f"model {model!r} takes the inputs {list(declared)}"
            + (f"; unknown: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
            + f"; or send one BYTES input named {TEXT_INPUT!r} to run its pipeline"
        )
    for name, node in declared.items():
        given, wanted = datatype_of(arrays[name].dtype), ORT_DATATYPES.get(node.type, node.type)
        if given != wanted:
            raise InvalidArgument(f"input {name!r} of model {model!r} is {wanted}, not {given}")
        if arrays[name].ndim != len(node.shape):
            raise InvalidArgument(
                f"input {name!r} of model {model!r} has {len(node.shape)} dimensions, not {arrays[name].ndim}"
            )


def _texts(arrays: dict[str, np.ndarray], name: str) -> list[str]:
    if arrays[name].dtype != object:
        raise InvalidArgument(f"input {name!r} must be BYTES (UTF-8 text)")
    try:
        return [bytes(value).decode() for value in arrays[name].flat]
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"input {name!r} holds bytes that are not UTF-8: {error}") from error


def pipeline_mapping(model: LoadedModel, main_input: str) -> KServeText | KServeFiles:
    """The typed RPC a text (or image, or audio) request runs on this model, and the field `text`
    (or `image`, or `audio`) fills: its task's registration's."""
    registration = registration_for(model.task)
    mapping = None
    if registration is not None and model.pipeline is not None:
        files = {IMAGE_INPUT: registration.kserve_image, AUDIO_INPUT: registration.kserve_audio}
        mapping = files.get(main_input, registration.kserve_text)
    if mapping is None:
        raise Unimplemented(
            f"model {model.name!r} ({task_name(model.task)}) has no pipeline here for a {main_input!r} input"
        )
    return mapping


def _files(arrays: dict[str, np.ndarray], name: str) -> list[bytes]:
    if arrays[name].dtype != object:
        raise InvalidArgument(f"input {name!r} must be BYTES (encoded {name} files)")
    return [bytes(value) for value in arrays[name].flat]


def _main_input(arrays: dict[str, np.ndarray]) -> str | None:
    """The input that makes a request a pipeline request: `image`, `audio` or `text`; None for tensors."""
    return next((name for name in (IMAGE_INPUT, AUDIO_INPUT, TEXT_INPUT) if name in arrays), None)


class KServeServicer(v2_grpc.GRPCInferenceServiceServicer):
    """ServerLive to ModelInfer; the repository extension (load, unload) answers UNIMPLEMENTED.
    Requests run on the model's execution path (models/loaded.py), as typed calls do."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def ServerLive(self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Message:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Message:
        # The health service's readiness rule (every required model READY), so that both agree.
        return v2.ServerReadyResponse(ready=self.registry.ready())

    async def ModelReady(self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.get(request.name, parse_version(request.version))
        return v2.ModelReadyResponse(ready=model.state == models_pb2.MODEL_STATE_READY)

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        return v2.ServerMetadataResponse(name="onnxserve", version=onnxserve.__version__)

    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.get(request.name, parse_version(request.version))
        versions = [str(m.version) for m in self.registry.models() if m.name == model.name]
        response = v2.ModelMetadataResponse(name=model.name, versions=versions, platform=PLATFORM)
        graph = model.graph
        if graph is not None:
            response.inputs.extend(tensor_metadata(graph.session.get_inputs()))
            response.outputs.extend(tensor_metadata(graph.session.get_outputs()))
        return response

    async def ModelInfer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext) -> Message:
        model = self.registry.resolve(request.model_name, parse_version(request.model_version))
        arrays = decode_inputs(request)
        if _main_input(arrays) is not None:
            outputs = await self._run_pipeline(model, arrays, request, context)
        elif request.parameters:
            raise InvalidArgument(
                f"parameters apply to pipeline requests (a {TEXT_INPUT!r}, {IMAGE_INPUT!r} or {AUDIO_INPUT!r} "
                "input); tensors take none"
            )
        else:
            outputs = await self._run_tensors(model, arrays)
        requested = [output.name for output in request.outputs]
        response = v2.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        encode_outputs(response, select_outputs(outputs, requested, model.name))
        return response

    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_EXTENSION)

    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Message:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_EXTENSION)

    async def _run_tensors(self, model: LoadedModel, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Straight on the session, outside the batcher: the caller's tensors are already a batch,
        # padded as the caller chose, so there is nothing to merge them with.
        session = tensor_graph(model)
        check_feeds(model.name, session, arrays)
        try:
            return await model.run_graph(arrays)
        except GraphRefused as error:
            # What check_feeds cannot see: shapes that disagree, ids outside the vocabulary.
            raise InvalidArgument(f"model {model.name!r} refused the inputs: {error}") from error

    async def _run_pipeline(
        self,
        model: LoadedModel,
        arrays: dict[str, np.ndarray],
        request: v2.ModelInferRequest,
        context: grpc.aio.ServicerContext,
    ) -> dict[str, np.ndarray]:
        """A `text`, `image` or `audio` request: the typed call of the task's mapping, on its execution path."""
        main_input = _main_input(arrays)
        mapping = pipeline_mapping(model, main_input)
        files = [] if main_input == TEXT_INPUT else _files(arrays, main_input)
        texts = {name: _texts(arrays, name) for name in arrays if name != main_input or main_input == TEXT_INPUT}
        typed = build_request(mapping, model.name, texts, request.parameters, files)
        response = await model.run(mapping.rpc, typed, context.time_remaining())
        return response_tensors(response)
