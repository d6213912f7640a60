"""The drivers of one request's decoding, once it is set up (preparation.py).

A `SoloGeneration` has a step model of its own and advances one model step per call, on the
generation executor; a `SharedGeneration` joins the model's shared batch (continuous batching,
scheduler.py), for fused decoders, and is stepped on the scheduler's thread. `run` and `stream`
drive either from the event loop with the steps off it, so that other models' calls keep being
served between steps, and so that a cancelled call (the client gone, its deadline passed) stops
within a step and frees its cache."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import aclosing

import numpy as np
from onnxserve.server.runtime.stats import DecodingStats, Timings
from onnxserve.server.tasks.generation.preparation import GenerationRequest
from onnxserve.server.tasks.generation.scheduler import Scheduler, SharedRequest

from onnxserve.v1 import inference_pb2


class Generation(ABC):
    """One request's decoding: its prompts, settings and outputs, and the messages made of them.
    `steps` advances it, yielding after each step it took."""

    def __init__(self, request: GenerationRequest, timings: Timings) -> None:
        self.prompts = request.prompts
        self.settings = request.settings
        self.outputs = request.outputs
        self.timings = timings
        self._prompt_streamed = not request.settings.return_full_text

    @property
    def done(self) -> bool:
        return all(output.finished for output in self.outputs)

    @abstractmethod
    def steps(self, executor: Executor, streaming: bool) -> AsyncIterator[None]:
        """Decodes, yielding after each step (a solo generation's steps run on `executor`);
        closing it ends decoding and frees the cache."""

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
        request: GenerationRequest,
        timings: Timings,
        steps: Iterator[None],
        release: Callable[[], None],
        stats: DecodingStats,
    ) -> None:
        super().__init__(request, timings)
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
        request: GenerationRequest,
        timings: Timings,
        scheduler: Scheduler,
        history: np.ndarray,
        encoder_states: np.ndarray | None = None,
    ) -> None:
        """`encoder_states`: an encoder-decoder's, one row per sequence (whose first decoder
        tokens are then the request's token_ids)."""
        super().__init__(request, timings)
        self._scheduler = scheduler
        self._request = SharedRequest(
            request.token_ids,
            history,
            request.outputs,
            request.decoding,
            timings,
            self._on_step,
            self._on_end,
            encoder_states,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streaming = False
        self._woken = asyncio.Event()
        self._messages: list[inference_pb2.GenerateStreamResponse] = []
        self._left = False
        self._error: BaseException | None = None

    async def steps(self, executor: Executor, streaming: bool) -> AsyncIterator[None]:
        self._loop, self._streaming = asyncio.get_running_loop(), streaming
        self._scheduler.submit(self._request)
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
