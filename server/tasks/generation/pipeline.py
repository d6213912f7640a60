"""Generate and GenerateStream: the generation pipeline of causal and seq2seq models.

`GenerationPipeline.start` checks and tokenizes a request and sets up its decoding as a
`Generation`. A `SoloGeneration` has a step model of its own and advances one model step per
call; a `SharedGeneration` joins the model's shared batch (continuous batching, scheduler.py),
for fused decoders. `run` and `stream` drive either from the event loop with the steps off it (in
the executor, or on the scheduler's thread), so that other models' calls keep being served
between steps, and so that a cancelled call (the client gone, its deadline passed) stops within a
step and frees its cache."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import aclosing
from typing import Any

import numpy as np
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.tasks.base import WARMUP_TEXT, ModelResources, Pipeline, require_batch
from onnxserve.server.tasks.generation import logits
from onnxserve.server.tasks.generation.causal import left_pad, open_causal_model
from onnxserve.server.tasks.generation.decoding import Decoding, Sampler, StepModel, decode
from onnxserve.server.tasks.generation.fused import FusedGraph, is_fused
from onnxserve.server.tasks.generation.scheduler import DecodingStats, Scheduler, SharedRequest
from onnxserve.server.tasks.generation.seq2seq import Seq2SeqModel
from onnxserve.server.tasks.generation.settings import MAX_SEQUENCES, GenerationSettings, resolve_settings
from onnxserve.server.tasks.generation.stopping import OutputSequence, StoppingCriteria
from onnxserve.server.tasks.generation.streaming import IncrementalDecoder
from onnxserve.server.tasks.registration import (
    DECODER_VARIANTS,
    SEQ2SEQ_GRAPHS,
    ExportSpec,
    KServeText,
    TaskRegistration,
)

from onnxserve.v1 import common_pb2, inference_pb2


class Generation(ABC):
    """One request's decoding: its prompts, settings and outputs, and the messages made of them.
    `steps` advances it, yielding after each step it took."""

    def __init__(
        self, prompts: Sequence[str], settings: GenerationSettings, outputs: list[OutputSequence], timings: Timings
    ) -> None:
        self.prompts = prompts
        self.settings = settings
        self.outputs = outputs
        self.timings = timings
        self._prompt_streamed = not settings.return_full_text

    @property
    def done(self) -> bool:
        return all(output.finished for output in self.outputs)

    @abstractmethod
    def steps(self, executor: Executor, streaming: bool) -> AsyncIterator[None]:
        """Decodes, yielding after each step; closing it ends decoding and frees the cache."""

    def new_messages(self) -> list[inference_pb2.GenerateStreamResponse]:
        """The stream messages of the steps taken since the last call."""
        message = self.stream_message()
        return [] if message is None else [message]

    def _text(self, index: int) -> str:
        text = self.outputs[index].text
        return self.prompts[index] + text if self.settings.return_full_text else text

    def response(self) -> inference_pb2.GenerateResponse:
        response = inference_pb2.GenerateResponse()
        for index, output in enumerate(self.outputs):
            response.results.add(
                generated_text=self._text(index),
                token_ids=output.tokens,
                generated_tokens=len(output.tokens),
                finish_reason=output.finish_reason,
            )
        return response

    def stream_message(self) -> inference_pb2.GenerateStreamResponse | None:
        """The new piece of the (only) sequence since the last message, None when nothing new is
        printable yet; the last message carries the finish reason and the whole text. With
        return_full_text the prompt comes first, so that the pieces still join into the text."""
        output = self.outputs[0]
        piece, tokens = output.release()
        if not self._prompt_streamed:
            piece, self._prompt_streamed = self.prompts[0] + piece, True
        if not output.finished:
            return inference_pb2.GenerateStreamResponse(text=piece, token_ids=tokens) if piece else None
        return inference_pb2.GenerateStreamResponse(
            text=piece, token_ids=tokens, finish_reason=output.finish_reason, generated_text=self._text(0)
        )


class SoloGeneration(Generation):
    """A generation on a step model of its own, a model step per `step()` in the executor. Steps
    and `close()` take a lock, so a close that arrives while a step runs waits for it (on the
    executor, not the event loop)."""

    def __init__(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        outputs: list[OutputSequence],
        timings: Timings,
        steps: Iterator[None],
        release: Callable[[], None],
        stats: DecodingStats,
    ) -> None:
        super().__init__(prompts, settings, outputs, timings)
        self._steps = steps
        self._release = release
        self._stats = stats
        self._lock = threading.Lock()
        self._closed = False
        self._started = False  # the cache fills from the first step on; counted as active from then

    def step(self) -> bool:
        """Runs the next model step; False once decoding has ended (or was closed)."""
        with self._lock:
            if self._closed or self.done:
                return False
            if not self._started:
                self._started = True
                self._stats.add(active=1)
            started, inference = time.perf_counter_ns(), self.timings.inference_ns
            next(self._steps)
            self._stats.add(steps=1, runs=1)
            spent = time.perf_counter_ns() - started
            self.timings.postprocess_ns += spent - (self.timings.inference_ns - inference)
            return True

    def close(self) -> None:
        """Ends decoding and frees the cache; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._steps.close()
            self._release()
            if self._started:
                self._stats.add(active=-1)

    async def steps(self, executor: Executor, streaming: bool) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            while await loop.run_in_executor(executor, self.step):
                yield
        finally:
            # Reached on completion and on cancellation alike. A cancelled step may still be
            # running in the executor: close there, after it, not on the event loop.
            try:
                executor.submit(self.close)
            except RuntimeError:  # the executor is shut down: nothing runs a step any more
                self.close()


class SharedGeneration(Generation):
    """A generation in the model's shared batch (scheduler.py). The scheduler's thread steps it
    and hands over what the event loop needs (each stream message, the end) with
    call_soon_threadsafe, so the event loop never reads outputs that the thread is changing."""

    def __init__(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        outputs: list[OutputSequence],
        timings: Timings,
        scheduler: Scheduler,
        token_ids: list[list[int]],
        history: np.ndarray,
        decoding: Decoding,
    ) -> None:
        super().__init__(prompts, settings, outputs, timings)
        self._scheduler = scheduler
        self._request = SharedRequest(token_ids, history, outputs, decoding, timings, self._on_step, self._on_end)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streaming = False
        self._woken = asyncio.Event()
        self._messages: list[inference_pb2.GenerateStreamResponse] = []
        self._left = False
        self._error: BaseException | None = None

    async def steps(self, executor: Executor, streaming: bool) -> AsyncIterator[None]:
        self._loop, self._streaming = asyncio.get_running_loop(), streaming
        self._scheduler.submit(self._request, executor)
        try:
            while True:
                await self._woken.wait()
                self._woken.clear()
                # Read before yielding: what was delivered before the end is taken at this yield;
                # an end that arrives during it wakes the loop for one more.
                left = self._left
                if self._error is not None:
                    raise self._error
                yield
                if left:
                    return
        finally:
            if not self._left:
                self._scheduler.cancel(self._request)

    def new_messages(self) -> list[inference_pb2.GenerateStreamResponse]:
        messages, self._messages = self._messages, []
        return messages

    def _on_step(self) -> None:
        """On the scheduler's thread, after each step."""
        message = self.stream_message() if self._streaming else None
        self._notify(self._deliver, message)

    def _on_end(self, error: BaseException | None) -> None:
        """On the scheduler's thread, once the generation left the batch."""
        self._notify(self._leave, error)

    def _notify(self, callback: Callable, argument: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the server stopped, nobody waits
            self._loop.call_soon_threadsafe(callback, argument)

    def _deliver(self, message: inference_pb2.GenerateStreamResponse | None) -> None:
        if message is not None:
            self._messages.append(message)
        self._woken.set()

    def _leave(self, error: BaseException | None) -> None:
        self._left, self._error = True, error
        self._woken.set()


async def run(generation: Generation, executor: Executor) -> inference_pb2.GenerateResponse:
    """Decodes to the end; the unary response."""
    async with aclosing(generation.steps(executor, streaming=False)) as steps:
        async for _ in steps:
            pass
    return generation.response()


async def stream(generation: Generation, executor: Executor) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
    """One message per new piece of text, as soon as its step ends; the last one ends the stream.
    `aclosing`: a call cancelled while a message is being sent still closes the steps at once."""
    async with aclosing(generation.steps(executor, streaming=True)) as steps:
        async for _ in steps:
            for message in generation.new_messages():
                yield message


class GenerationPipeline(Pipeline[Any]):
    """Causal LMs (role "model") and encoder-decoders (roles "encoder" and "decoder"). Requests are
    set up and decoded on the generation executor, or on the scheduler's thread for a shared batch."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.defaults = self.manifest.generation
        self.seq2seq = "encoder" in self.sessions
        needed = {"encoder", "decoder"} if self.seq2seq else {"model"}
        if not needed <= self.sessions.keys():
            raise ModelLoadError(f"a generation model needs the graphs {sorted(needed)}; got {sorted(self.sessions)}")
        if self.seq2seq and not self.defaults.HasField("decoder_start_token_id"):
            raise ModelLoadError("the manifest names no decoder_start_token_id for this encoder-decoder")
        self.eos_token_ids = tuple(self.defaults.eos_token_ids)
        self.pad_token_id = self.defaults.pad_token_id if self.defaults.HasField("pad_token_id") else 0
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
        return Scheduler(graph, settings.max_generation_rows, settings.max_queue_size, self.context, self.stats)

    async def run(
        self, rpc: str, request: inference_pb2.GenerateRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.GenerateResponse:
        """Generate. A deadline ends the call through gRPC's cancellation, within one step."""
        generation = await self._start(request.prompts, request.parameters, timings)
        return await run(generation, self.executors.generation)

    async def stream(
        self, rpc: str, request: inference_pb2.GenerateStreamRequest, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[inference_pb2.GenerateStreamResponse, bool]]:
        """GenerateStream: the last message is the one with the finish reason."""
        generation = await self._start([request.prompt], request.parameters, timings)
        async for message in stream(generation, self.executors.generation):
            yield message, bool(message.finish_reason)

    async def _start(
        self, prompts: Sequence[str], parameters: inference_pb2.GenerationParameters, timings: Timings
    ) -> Generation:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executors.generation, self.start, prompts, parameters, timings)

    async def warm_up(self) -> None:
        """Tokenizing only, with the bare tokenizer: a configured copy would only take memory (a
        third of a GB for Gemma's 262k-piece vocabulary), and decoding allocates per request."""
        self.tokenizer.tokenizer.encode(WARMUP_TEXT)

    @property
    def context(self) -> int:
        """The longest decoder sequence: prompt plus new tokens (causal), start plus new (seq2seq)."""
        return self.defaults.max_length or self.manifest.max_length

    def start(
        self, prompts: Sequence[str], parameters: inference_pb2.GenerationParameters, timings: Timings
    ) -> Generation:
        require_batch(prompts, "prompts")
        token_ids = timings.timed("tokenization", lambda: self._tokenize(prompts))
        timings.tokens = sum(len(ids) for ids in token_ids)
        settings = resolve_settings(parameters, self.defaults, self._room(token_ids))
        timings.batch_size = len(prompts) * settings.num_beams
        if timings.batch_size > MAX_SEQUENCES:
            raise InvalidArgument(
                f"{len(prompts)} prompts x {settings.num_beams} beams make {timings.batch_size} sequences, "
                f"over the server's limit of {MAX_SEQUENCES} per request"
            )
        outputs = [self._output(settings) for _ in prompts]
        history_length = max(len(ids) for ids in token_ids)
        decoding = self._decoding(settings, 1 if self.seq2seq else history_length)
        # Beam search reorders its rows at every step, and a request larger than the shared batch
        # would never fit: those run on a step model of their own.
        if self.scheduler is not None and settings.num_beams == 1 and self.scheduler.fits(len(prompts)):
            history, _ = left_pad(token_ids, self.pad_token_id)
            return SharedGeneration(prompts, settings, outputs, timings, self.scheduler, token_ids, history, decoding)
        model = self._model(token_ids, settings, lambda work: timings.timed("inference", work))
        steps = decode(model, outputs, decoding)
        return SoloGeneration(prompts, settings, outputs, timings, steps, model.release, self.stats)

    def _tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        token_ids = [encoding.ids for encoding in self.tokenizer.tokenizer.encode_batch(list(prompts))]
        limit = self.manifest.max_length if self.seq2seq else self.context - 1
        for index, ids in enumerate(token_ids):
            if len(ids) > limit:
                raise InvalidArgument(
                    f"prompts[{index}] has {len(ids)} tokens, longer than the model's context allows "
                    f"({limit} tokens{'' if self.seq2seq else ', leaving room for one new token'})"
                )
            if not ids and not self.seq2seq:
                if not self.defaults.HasField("bos_token_id"):
                    raise InvalidArgument(f"prompts[{index}] is empty and the model has no BOS token to start from")
                ids.append(self.defaults.bos_token_id)
        return token_ids

    def _room(self, token_ids: list[list[int]]) -> int:
        if self.seq2seq:
            return self.context - 1  # the decoder start token takes one position
        return self.context - max(len(ids) for ids in token_ids)

    def _model(self, token_ids: list[list[int]], settings: GenerationSettings, timed: Callable) -> StepModel:
        if self.seq2seq:
            start = self.defaults.decoder_start_token_id
            return Seq2SeqModel(self.sessions, token_ids, self.pad_token_id, start, timed)
        rows = len(token_ids) * settings.num_beams
        return open_causal_model(
            self.sessions["model"], token_ids, self.pad_token_id, timed, rows, settings.max_new_tokens
        )

    def _output(self, settings: GenerationSettings) -> OutputSequence:
        criteria = StoppingCriteria(settings.max_new_tokens, frozenset(self.eos_token_ids), settings.stop)
        return OutputSequence(criteria, IncrementalDecoder(self.tokenizer.tokenizer))

    def _decoding(self, settings: GenerationSettings, history_length: int) -> Decoding:
        d = self.defaults
        forced_eos = (d.forced_eos_token_id,) if d.HasField("forced_eos_token_id") else ()
        processors = logits.processors(
            repetition_penalty=settings.repetition_penalty,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            suppress_token_ids=list(d.suppress_token_ids),
            forced_bos_token_id=d.forced_bos_token_id if d.HasField("forced_bos_token_id") else None,
            forced_eos_token_ids=forced_eos,
            max_length=history_length + settings.max_new_tokens,
        )
        # Beam sampling keeps one token more than there are EOS ids, so a beam can always go on.
        min_keep = (len(self.eos_token_ids) + 1 if self.eos_token_ids else 2) if settings.num_beams > 1 else 1
        return Decoding(
            processors=processors,
            warpers=logits.warpers(settings.temperature, settings.top_k, settings.top_p, min_keep),
            sampler=Sampler(settings.seed) if settings.do_sample else None,
            num_beams=settings.num_beams,
            length_penalty=settings.length_penalty,
            early_stopping=settings.early_stopping,
            eos_token_ids=self.eos_token_ids,
            max_new_tokens=settings.max_new_tokens,
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
