"""Generate and GenerateStream: the generation pipeline of causal and seq2seq models.

A request is set up (preparation.py), then decoded by a driver (drivers.py): alone on a step
model of its own, on the generation executor, or in the model's shared batch (continuous
batching, scheduler.py, on the scheduler's own thread) for fused decoders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.runtime.stats import DecodingStats, Timings
from onnxserve.server.tasks.base import WARMUP_TEXT, ModelResources, Pipeline
from onnxserve.server.tasks.generation.causal import left_pad, open_causal_model
from onnxserve.server.tasks.generation.decoding import StepModel, decode
from onnxserve.server.tasks.generation.drivers import Generation, SharedGeneration, SoloGeneration, run, stream
from onnxserve.server.tasks.generation.fused import FusedGraph, is_fused
from onnxserve.server.tasks.generation.preparation import GenerationRequest, RequestSetup
from onnxserve.server.tasks.generation.scheduler import Scheduler
from onnxserve.server.tasks.generation.seq2seq import Seq2SeqModel
from onnxserve.server.tasks.registration import (
    DECODER_VARIANTS,
    SEQ2SEQ_GRAPHS,
    ExportSpec,
    KServeText,
    TaskRegistration,
)

from onnxserve.v1 import common_pb2, inference_pb2


class GenerationPipeline(Pipeline[Any]):
    """Causal LMs (role "model") and encoder-decoders (roles "encoder" and "decoder"). Requests are
    set up and decoded on the generation executor, or on the scheduler's thread for a shared batch."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.defaults = self.manifest.generation
        self.seq2seq = "encoder" in self.sessions
        self.require_graphs("a generation model", *(("encoder", "decoder") if self.seq2seq else ("model",)))
        if self.seq2seq and not self.defaults.HasField("decoder_start_token_id"):
            raise ModelLoadError("the manifest names no decoder_start_token_id for this encoder-decoder")
        self.setup = RequestSetup(self.manifest, self.tokenizer.tokenizer, self.seq2seq)
        self.stats = DecodingStats()
        self.scheduler = self._scheduler(resources.settings)

    def _scheduler(self, settings: ModelSettings) -> Scheduler | None:
        """Continuous batching, for a fused decoder with max_generation_rows > 0."""
        model = self.sessions.get("model")
        if self.seq2seq or not is_fused(model):
            return None
        graph = FusedGraph(model)  # built even without the scheduler: it refuses what the device cannot run
        if settings.max_generation_rows <= 0:
            return None
        rows, waiting = settings.max_generation_rows, settings.max_queue_size
        return Scheduler(self.name, graph, rows, waiting, self.context, self.stats)

    async def run(
        self, rpc: str, request: inference_pb2.GenerateRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.GenerateResponse:
        """Generate. A deadline ends the call through gRPC's cancellation, within one step."""
        generation = await self._start(lambda: self.setup(request.prompts, request.parameters, timings), timings)
        return await run(generation, self.executors.generation)

    async def stream(
        self, rpc: str, request: inference_pb2.GenerateStreamRequest, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[inference_pb2.GenerateStreamResponse, bool]]:
        """GenerateStream: the last message is the one with the finish reason."""
        generation = await self._start(lambda: self.setup([request.prompt], request.parameters, timings), timings)
        async for message in stream(generation, self.executors.generation):
            yield message, bool(message.finish_reason)

    async def _start(self, setup: Callable[[], GenerationRequest], timings: Timings) -> Generation:
        """The request set up by `setup`, and its driver, on the generation executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executors.generation, lambda: self.start(setup(), timings))

    async def warm_up(self) -> None:
        """Tokenizing only, with the bare tokenizer: a configured copy would only take memory (a
        third of a GB for Gemma's 262k-piece vocabulary), and decoding allocates per request."""
        self.tokenizer.tokenizer.encode(WARMUP_TEXT)

    @property
    def context(self) -> int:
        return self.setup.context

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def start(self, request: GenerationRequest, timings: Timings) -> Generation:
        """Picks the request's driver."""
        # Beam search reorders its rows at every step, and a request larger than the shared batch
        # would never fit: those run on a step model of their own.
        rows = len(request.prompts)
        if self.scheduler is not None and request.settings.num_beams == 1 and self.scheduler.fits(rows):
            history, _ = left_pad(request.token_ids, self.setup.pad_token_id)
            return SharedGeneration(request, timings, self.scheduler, history)
        model = self._model(request, lambda work: timings.timed("inference", work))
        steps = decode(model, request.outputs, request.decoding)
        return SoloGeneration(request, timings, steps, model.release, self.stats)

    def _model(self, request: GenerationRequest, timed: Callable) -> StepModel:
        if self.seq2seq:
            start = self.defaults.decoder_start_token_id
            return Seq2SeqModel(self.sessions, request.encoder_inputs, start, timed)
        settings = request.settings
        rows = len(request.token_ids) * settings.num_beams
        return open_causal_model(
            self.sessions["model"], request.token_ids, self.setup.pad_token_id, timed, rows, settings.max_new_tokens
        )


_GENERATION_RPCS = frozenset({"Generate", "GenerateStream"})
TEXT_GENERATION = TaskRegistration(
    name="text-generation",
    task=common_pb2.TASK_TEXT_GENERATION,
    pipeline=GenerationPipeline,
    rpcs=_GENERATION_RPCS,
    kserve_text=KServeText("Generate", "prompts"),
    export=ExportSpec(
        "text-generation-with-past",
        "AutoModelForCausalLM",
        variants=DECODER_VARIANTS,
        default_precisions=("fp32", "fp16", "int8", "int4"),
        validator="generative",
        fused_decoder=True,
        generation_config=True,
    ),
)
TEXT2TEXT_GENERATION = TaskRegistration(
    name="text2text-generation",
    task=common_pb2.TASK_TEXT2TEXT_GENERATION,
    pipeline=GenerationPipeline,
    rpcs=_GENERATION_RPCS,
    kserve_text=KServeText("Generate", "prompts"),
    export=ExportSpec(
        "text2text-generation-with-past", "AutoModelForSeq2SeqLM", graphs=SEQ2SEQ_GRAPHS, generation_config=True
    ),
)
