"""The seed's three steps as the shape of every task: preprocess (tokenize) -> forward (an ONNX
Runtime session) -> postprocess. A task module subclasses one of the pipelines here."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import InvalidArgument, ModelLoadError, Unimplemented
from onnxserve.server.runtime.batching import BatchRunner, RowOutputs, merges_safely
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import TextTokenizer, batch_arrays
from tokenizers import Encoding

from onnxserve.v1 import common_pb2, manifest_pb2

T = TypeVar("T")
Request = TypeVar("Request", bound=Message)
WARMUP_TEXT = "Warm-up: the first run of a session allocates its buffers and picks its kernels."
#: A text request of at most this many bytes (a few short texts) is tokenized and postprocessed on
#: the event loop: that takes tens of microseconds, less than a round trip through a thread pool
#: (submit, wake-up, future chaining), which the profile showed as the largest per-call entries
#: after gRPC itself (docs/performance.md). Larger requests keep the loop free for other calls.
INLINE_REQUEST_BYTES = 1024


@dataclass(frozen=True)
class Executors:
    """The server's thread pools for blocking work: `tokenizing` for the short steps of a call
    (tokenizing, postprocessing), `generation` for generation steps, kept apart so that however
    many generations run (or a long prefill), encoder calls still get threads for tokenizing."""

    tokenizing: Executor
    generation: Executor


@dataclass
class ModelResources:
    """What a pipeline is built from: the model's name, manifest, tokenizer (None for vision
    models), sessions by role, serving settings, the thread pools it runs its blocking work on, the
    precision served, and the version's folder (speech models read their feature extractor's
    configuration there)."""

    name: str
    manifest: manifest_pb2.Manifest
    tokenizer: TextTokenizer | None
    sessions: dict[str, Session]
    executors: Executors
    settings: ModelSettings = field(default_factory=ModelSettings)
    precision: int = common_pb2.PRECISION_FP32
    directory: Path | None = None


@dataclass
class Prepared:
    """The output of preprocess: the inputs to run (token sequences, or images for vision
    pipelines), plus whatever postprocess needs."""

    sequences: list[Any]
    context: dict[str, Any] = field(default_factory=dict)


class Pipeline(ABC, Generic[Request]):
    """A task's pipeline, built once per loaded model version: what the execution layer
    (models/loaded.py) runs every RPC of the task through, whichever protocol it came by."""

    def __init__(self, resources: ModelResources) -> None:
        self.name = resources.name
        self.manifest = resources.manifest
        self.tokenizer = resources.tokenizer
        self.sessions = resources.sessions
        self.executors = resources.executors

    def require_graphs(self, family: str, *names: str) -> None:
        """Refuses a version that lacks any of the graphs `names`, naming what it has."""
        if not set(names) <= self.sessions.keys():
            raise ModelLoadError(f"{family} needs the graphs {sorted(names)}; got {sorted(self.sessions)}")

    def open(self) -> None:
        """Starts what the pipeline serves with, once it is built (blocking, at load time)."""

    async def close(self) -> None:
        """Stops what `open` started."""

    @abstractmethod
    async def run(self, rpc: str, request: Request, timings: Timings, time_left: float | None) -> Message:
        """Answers a unary RPC of the task (its metadata is filled by the caller). `time_left` is
        the caller's remaining time in seconds (None: no deadline)."""

    def stream(
        self, rpc: str, request: Request, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[Message, bool]]:
        """Answers a server-streaming RPC: each message, with True on the last one."""
        raise Unimplemented(f"{rpc} is not a streaming RPC of model {self.name!r}")

    @abstractmethod
    async def warm_up(self) -> None:
        """Runs once what calls run, so that the first call does not pay for lazy allocations."""

    def queue_depth(self) -> int | None:
        """Requests waiting in the pipeline's queue; None when it has none to report."""
        return None

    def observe_runs(self, callback: Callable[[int, int], None]) -> None:
        """`callback(rows, padded_tokens)` after each batched run, for pipelines that batch."""

    async def _blocking(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executors.tokenizing, work)


class BatchedPipeline(Pipeline[Request]):
    """A pipeline over one graph whose forward step runs batches of inputs (token sequences,
    images). Because forward takes plain inputs, its batcher can merge inputs from many requests
    into one run and hand each request its own rows back."""

    #: Requests of at most this many serialized bytes are preprocessed and postprocessed on the
    #: event loop rather than on the tokenizing executor; 0: none.
    inline_request_bytes = 0

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.session = resources.sessions["model"]
        self.settings = resources.settings
        self.precision = resources.precision
        self.runner: BatchRunner | None = None

    def open(self) -> None:
        """The batcher. Requests share runs only if the model's answers do not move with their
        batchmates, which is measured here, on the built pipeline's own forward."""
        self.runner = BatchRunner(self.name, self.forward, self.settings, merge_requests=self.merges_safely())

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()

    @abstractmethod
    def merges_safely(self) -> bool:
        """Whether the model's outputs for an input stay put whatever it is batched with."""

    @abstractmethod
    def preprocess(self, request: Request) -> Prepared:
        """Validates the request and turns its inputs into what forward runs."""

    @abstractmethod
    def forward(self, inputs: Sequence[Any]) -> list[RowOutputs]:
        """Runs one batch and splits the outputs back into one entry per input."""

    @abstractmethod
    def postprocess(self, request: Request, prepared: Prepared, outputs: list[RowOutputs]) -> Message:
        """Turns each input's outputs into the response (its metadata is filled later)."""

    @abstractmethod
    def warm_up_inputs(self) -> list[Any]:
        """A small input for warm-up, of the kind preprocess makes."""

    def input_tokens(self, prepared: Prepared) -> int:
        """The tokens a request's inputs hold, for its Metadata; none by default (images)."""
        return 0

    async def run(self, rpc: str, request: Request, timings: Timings, time_left: float | None) -> Message:
        """preprocess -> forward (through the batcher, which drops the request if its deadline
        passes while it waits) -> postprocess."""
        inline = request.ByteSize() <= self.inline_request_bytes
        prepared = await self._step(inline, lambda: timings.timed("tokenization", lambda: self.preprocess(request)))
        timings.tokens = self.input_tokens(prepared)
        outputs = await self._runner().infer(prepared.sequences, timings, time_left)
        return await self._step(
            inline, lambda: timings.timed("postprocess", lambda: self.postprocess(request, prepared, outputs))
        )

    async def _step(self, inline: bool, work: Callable[[], T]) -> T:
        """`work` on the event loop when `inline`, else on the tokenizing executor."""
        return work() if inline else await self._blocking(work)

    async def warm_up(self) -> None:
        """One small input through the batcher."""
        await self._runner().infer(self.warm_up_inputs(), Timings())

    def queue_depth(self) -> int | None:
        return self._runner().waiting

    def observe_runs(self, callback: Callable[[int, int], None]) -> None:
        self._runner().on_run = callback

    def _runner(self) -> BatchRunner:
        if self.runner is None:
            raise RuntimeError(f"the pipeline of model {self.name!r} was not opened")
        return self.runner


class EncoderPipeline(BatchedPipeline[Request]):
    """A pipeline over one text encoder graph whose forward step runs batches of token sequences."""

    inline_request_bytes = INLINE_REQUEST_BYTES

    def merges_safely(self) -> bool:
        return merges_safely(self.name, self.forward, self.tokenizer, self.precision)

    def forward(self, sequences: Sequence[Encoding]) -> list[RowOutputs]:
        """Runs one padded batch and splits the outputs back into one entry per sequence, with
        per-token outputs cut to the sequence's own length."""
        feeds = batch_arrays(sequences, self.tokenizer.pad_token_id)
        outputs = self.session.run(feeds)
        rows = []
        for index, encoding in enumerate(sequences):
            length = len(encoding.ids)
            rows.append(
                {
                    name: value[index, :length] if name in self.session.per_token_outputs else value[index]
                    for name, value in outputs.items()
                }
            )
        return rows

    def input_tokens(self, prepared: Prepared) -> int:
        return sum(len(s.ids) for s in prepared.sequences)

    def warm_up_inputs(self) -> list[Encoding]:
        """One short text (tokenized in microseconds, on the loop)."""
        return self.tokenizer.encode([WARMUP_TEXT])


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def require_batch(values: Sequence[Any], field_name: str) -> None:
    if not values:
        raise InvalidArgument(f"the request holds no {field_name}: send at least one")
