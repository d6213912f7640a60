"""A loaded model version, and the one execution path every protocol takes through it.

The typed Inference service, the KServe v2 service and warm-up all call `LoadedModel.run`,
`.stream` or `.run_graph`, and only convert messages: which pipeline serves an RPC (the task's
registration), the refusal of an RPC the task does not serve, the executors, and the response's
Metadata are decided here once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.config.settings import ModelSettings, ServerSettings
from onnxserve.server.errors import InvalidArgument, Unimplemented
from onnxserve.server.models.limits import RequestLimits, check_request
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import TextTokenizer
from onnxserve.server.tasks import tokenizer_rpcs
from onnxserve.server.tasks.base import Executors, Pipeline
from onnxserve.server.tasks.registration import TOKENIZER_RPCS, registration_for, task_name

from onnxserve.v1 import common_pb2, manifest_pb2, models_pb2

#: Tokenize and Detokenize, served by every model's tokenizer.
TOKENIZER_WORK: dict[str, Callable[[TextTokenizer, Any, Timings], Message]] = {
    "Tokenize": tokenizer_rpcs.tokenize,
    "Detokenize": tokenizer_rpcs.detokenize,
}


@dataclass
class LoadedModel:
    """A model version in the server: READY with its pipeline, or FAILED with a reason."""

    name: str
    version: int
    directory: Path
    executors: Executors
    manifest: manifest_pb2.Manifest | None = None
    precision: int = common_pb2.PRECISION_UNSPECIFIED
    execution_provider: str = ""
    tokenizer: TextTokenizer | None = None
    pipeline: Pipeline | None = None
    settings: ModelSettings = field(default_factory=ModelSettings)
    state: int = models_pb2.MODEL_STATE_LOADING
    reason: str = ""
    # The served variant's figures on the export's probes, computed here at load (None: no probes).
    load_check: manifest_pb2.Validation | None = None
    refused_variants: list[models_pb2.RefusedVariant] = field(default_factory=list)
    # The server's largest response (its max_send_message_bytes), which bounds what a request may ask.
    max_response_bytes: int = ServerSettings.max_send_message_bytes

    @property
    def task(self) -> int:
        return self.manifest.task if self.manifest else common_pb2.TASK_UNSPECIFIED

    @property
    def limits(self) -> RequestLimits:
        hidden_size = self.manifest.hidden_size if self.manifest else 0
        return RequestLimits(
            self.settings.max_inputs_per_request, self.max_response_bytes, hidden_size, self._image_values()
        )

    def _image_values(self) -> int:
        """channels x height x width of the processed images (RGB, at the processor's output size)."""
        processing = self.manifest.image_processing if self.manifest else None
        if processing is None:
            return 0
        return 3 * (processing.crop_height or processing.height) * (processing.crop_width or processing.width)

    def served_rpcs(self) -> list[str]:
        registration = registration_for(self.task)
        has_tokenizer = registration is None or "text" in registration.inputs or self.tokenizer is not None
        tokenizer_rpcs = TOKENIZER_RPCS if has_tokenizer else ()
        return [*sorted(registration.rpcs if registration else ()), *sorted(tokenizer_rpcs)]

    async def run(self, rpc: str, request: Message, time_left: float | None = None) -> Message:
        """Answers a unary Inference RPC, its Metadata filled. `time_left` is the caller's
        remaining time in seconds (None: no deadline)."""
        started = time.perf_counter_ns()
        check_request(rpc, request, self.limits, self.name)
        timings = Timings()
        if rpc in TOKENIZER_WORK and rpc in self.served_rpcs():  # else refused, naming what it serves
            work, tokenizer = TOKENIZER_WORK[rpc], self._tokenizer()
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self.executors.tokenizing, work, tokenizer, request, timings)
        else:
            response = await self._pipeline_for(rpc).run(rpc, request, timings, time_left)
        self._fill_metadata(response, timings, started)
        return response

    async def stream(self, rpc: str, request: Message, time_left: float | None = None) -> AsyncIterator[Message]:
        """Answers a server-streaming Inference RPC; the last message carries the Metadata."""
        started = time.perf_counter_ns()
        timings = Timings()
        async for message, last in self._pipeline_for(rpc).stream(rpc, request, timings, time_left):
            if last:
                self._fill_metadata(message, timings, started)
            yield message

    @property
    def graph(self) -> Session | None:
        """The model's ONNX graph when it has exactly one: the graph tensor requests run on."""
        sessions = self.pipeline.sessions if self.pipeline is not None else {}
        return next(iter(sessions.values())) if len(sessions) == 1 else None

    async def run_graph(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model's single graph on the caller's tensors as they are: outside the batcher,
        since they are a batch already, padded as the caller chose."""
        graph = self.graph
        if graph is None:
            raise Unimplemented(
                f"model {self.name!r} ({task_name(self.task)}) has no single ONNX graph in this release to run "
                "tensors on"
            )
        return await asyncio.get_running_loop().run_in_executor(self.executors.tokenizing, graph.run, feeds)

    async def warm_up(self) -> None:
        """Runs what the first call would, so that it does not pay for lazy allocations."""
        if self.pipeline is not None:
            await self.pipeline.warm_up()

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.close()

    def _pipeline_for(self, rpc: str) -> Pipeline:
        """The pipeline serving `rpc`, or a clear refusal naming what the model does serve."""
        registration = registration_for(self.task)
        if registration is not None and rpc in registration.rpcs and self.pipeline is not None:
            return self.pipeline
        if registration is None:
            raise Unimplemented(f"{rpc} on {task_name(self.task)} models is not served by this release")
        raise InvalidArgument(
            f"model {self.name!r} is a {task_name(self.task)} model and does not serve {rpc}; "
            f"it serves {', '.join(self.served_rpcs())}"
        )

    def _tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise Unimplemented(f"model {self.name!r} has no tokenizer")
        return self.tokenizer

    def _fill_metadata(self, response: Message, timings: Timings, started_ns: int) -> None:
        metadata = response.metadata
        metadata.model = self.name
        metadata.version = self.version
        metadata.tokens = timings.tokens
        metadata.tokenization_ns = timings.tokenization_ns
        metadata.queue_ns = timings.queue_ns
        metadata.inference_ns = timings.inference_ns
        metadata.postprocess_ns = timings.postprocess_ns
        metadata.batch_size = timings.batch_size
        metadata.precision = self.precision
        metadata.execution_provider = self.execution_provider
        metadata.total_ns = time.perf_counter_ns() - started_ns
