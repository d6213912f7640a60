"""The seed's three steps as the shape of every task: preprocess (tokenize) -> forward (an ONNX
Runtime session) -> postprocess. A task module subclasses one of the pipelines here."""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.runtime.tokenizer import TextTokenizer, batch_arrays
from tokenizers import Encoding

from onnxserve.v1 import manifest_pb2

RowOutputs = dict[str, np.ndarray]
T = TypeVar("T")


@dataclass
class Timings:
    """What one request cost, stage by stage; copied into the response's Metadata."""

    tokens: int = 0
    tokenization_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0
    postprocess_ns: int = 0
    batch_size: int = 0

    def timed(self, stage: str, work: Callable[[], T]) -> T:
        """Runs `work`, adding its duration to the `<stage>_ns` counter."""
        start = time.perf_counter_ns()
        try:
            return work()
        finally:
            setattr(self, f"{stage}_ns", getattr(self, f"{stage}_ns") + time.perf_counter_ns() - start)


@dataclass
class ModelResources:
    """What a pipeline is built from: the manifest, the tokenizer, the sessions by role and the
    model's serving settings."""

    manifest: manifest_pb2.Manifest
    tokenizer: TextTokenizer
    sessions: dict[str, Session]
    settings: ModelSettings = field(default_factory=ModelSettings)


@dataclass
class Prepared:
    """The output of preprocess: the sequences to run, plus whatever postprocess needs."""

    sequences: list[Encoding]
    context: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """A task's pipeline, built once per loaded model version."""

    #: The Inference RPCs this pipeline serves, by method name.
    rpcs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, resources: ModelResources) -> None:
        self.manifest = resources.manifest
        self.tokenizer = resources.tokenizer
        self.sessions = resources.sessions


class EncoderPipeline(Pipeline, Generic[T]):
    """A pipeline over one encoder graph whose forward step runs batches of token sequences.
    Because forward takes plain sequences, the batcher can merge sequences from many requests
    into one run and hand each request its own rows back."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.session = resources.sessions["model"]

    @abstractmethod
    def preprocess(self, request: T) -> Prepared:
        """Validates the request and tokenizes its inputs."""

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

    @abstractmethod
    def postprocess(self, request: T, prepared: Prepared, outputs: list[RowOutputs]) -> Message:
        """Turns each sequence's outputs into the response (its metadata is filled later)."""


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def require_batch(values: Sequence[Any], field_name: str) -> None:
    if not values:
        raise InvalidArgument(f"the request holds no {field_name}: send at least one")
