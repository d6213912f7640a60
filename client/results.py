"""Plain Python results, with the attribute names of the transformers pipelines' output keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from onnxserve.enums import short_name
from onnxserve.v1 import common_pb2, inference_pb2, models_pb2

T = TypeVar("T")


@dataclass(frozen=True)
class Metadata:
    """Token counts and per-stage timings of one call, measured by the server."""

    model: str
    version: int
    tokens: int
    tokenization_ns: int
    queue_ns: int
    inference_ns: int
    postprocess_ns: int
    total_ns: int
    batch_size: int
    precision: str
    execution_provider: str

    @classmethod
    def from_proto(cls, message: common_pb2.Metadata) -> Metadata:
        return cls(
            model=message.model,
            version=message.version,
            tokens=message.tokens,
            tokenization_ns=message.tokenization_ns,
            queue_ns=message.queue_ns,
            inference_ns=message.inference_ns,
            postprocess_ns=message.postprocess_ns,
            total_ns=message.total_ns,
            batch_size=message.batch_size,
            precision=short_name(common_pb2.Precision, message.precision),
            execution_provider=message.execution_provider,
        )


@dataclass(frozen=True)
class Response(Generic[T]):
    """One result per input, in order, plus the call's metadata. Iterable and indexable."""

    results: list[T]
    metadata: Metadata

    def __iter__(self) -> Iterator[T]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> T:
        return self.results[index]


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """Labels by descending score; `label` and `score` are the best one's."""

    labels: list[LabelScore]
    sequence: str = ""

    @property
    def label(self) -> str:
        return self.labels[0].label

    @property
    def score(self) -> float:
        return self.labels[0].score

    @classmethod
    def from_proto(cls, message: inference_pb2.Classification) -> Classification:
        return cls([LabelScore(x.label, x.score) for x in message.labels], message.sequence)


@dataclass(frozen=True)
class Entity:
    entity: str
    entity_group: str
    score: float
    word: str
    start: int
    end: int
    index: int

    @classmethod
    def from_proto(cls, m: inference_pb2.Entity) -> Entity:
        return cls(m.entity, m.entity_group, m.score, m.word, m.start, m.end, m.index)


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float
    start: int
    end: int

    @classmethod
    def from_proto(cls, m: inference_pb2.Answer) -> Answer:
        return cls(m.answer, m.score, m.start, m.end)


@dataclass(frozen=True)
class MaskCandidate:
    score: float
    token: int
    token_str: str
    sequence: str

    @classmethod
    def from_proto(cls, m: inference_pb2.MaskCandidate) -> MaskCandidate:
        return cls(m.score, m.token, m.token_str, m.sequence)


@dataclass(frozen=True)
class GeneratedSequence:
    generated_text: str
    token_ids: list[int]
    generated_tokens: int
    finish_reason: str

    @classmethod
    def from_proto(cls, m: inference_pb2.GeneratedSequence) -> GeneratedSequence:
        return cls(m.generated_text, list(m.token_ids), m.generated_tokens, finish_reason(m.finish_reason))


@dataclass(frozen=True)
class Reconstruction:
    """ReconstructImage's answer for one image: `image` a PNG of the model's input size,
    `reconstruction` the model's output [channels, height, width] (normalized pixel space),
    `loss` the reconstruction loss, `masked_patches` the patch indices that were masked."""

    image: bytes
    reconstruction: np.ndarray
    loss: float
    masked_patches: list[int]

    @classmethod
    def from_proto(cls, m: inference_pb2.ImageReconstruction) -> Reconstruction:
        values = np.frombuffer(m.reconstruction, dtype="<f4").reshape(tuple(m.shape))
        return cls(m.image, values, m.loss, list(m.masked_patches))


@dataclass(frozen=True)
class BoundingBox:
    """A box in the original image's whole pixels, corners included."""

    xmin: int
    ymin: int
    xmax: int
    ymax: int


@dataclass(frozen=True)
class DetectedObject:
    score: float
    label: str
    box: BoundingBox

    @classmethod
    def from_proto(cls, m: inference_pb2.DetectedObject) -> DetectedObject:
        return cls(m.score, m.label, BoundingBox(m.box.xmin, m.box.ymin, m.box.xmax, m.box.ymax))


@dataclass(frozen=True)
class Segment:
    """One segment: `mask` the pipeline's mask as a PNG (mode L, 255 on the segment) of the
    original image's size, `mask_array` the same as booleans [height, width]; `score` None for
    semantic segmentation, as the pipeline."""

    label: str
    score: float | None
    mask: bytes
    mask_array: np.ndarray

    @classmethod
    def from_proto(cls, m: inference_pb2.Segment) -> Segment:
        packed = m.packed_mask
        bits = np.unpackbits(np.frombuffer(packed.bits, np.uint8), count=packed.width * packed.height)
        score = m.score if m.HasField("score") else None
        return cls(m.label, score, m.mask, bits.reshape(packed.height, packed.width).astype(bool))


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece; the last one carries finish_reason, generated_text and metadata."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    generated_text: str | None = None
    metadata: Metadata | None = None

    @classmethod
    def from_proto(cls, m: inference_pb2.GenerateStreamResponse) -> StreamChunk:
        last = m.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
        return cls(
            m.text,
            list(m.token_ids),
            finish_reason(m.finish_reason) if last else None,
            m.generated_text if last else None,
            Metadata.from_proto(m.metadata) if m.HasField("metadata") else None,
        )


@dataclass(frozen=True)
class TranscriptionChunk:
    """A timestamped piece of a transcription, as the pipeline's `chunks` items: `timestamp` is
    (start, end) in seconds, end None where the model did not close the segment."""

    text: str
    timestamp: tuple[float, float | None]

    @classmethod
    def from_proto(cls, m: inference_pb2.TranscriptionChunk) -> TranscriptionChunk:
        return cls(m.text, (m.start, m.end if m.HasField("end") else None))


@dataclass(frozen=True)
class Transcription:
    """The automatic-speech-recognition pipeline's result: `text`, and `chunks` when timestamps
    were asked for; Whisper's `language` and generated `token_ids`."""

    text: str
    chunks: list[TranscriptionChunk]
    language: str = ""
    token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_proto(cls, m: inference_pb2.Transcription) -> Transcription:
        chunks = [TranscriptionChunk.from_proto(c) for c in m.chunks]
        return cls(m.text, chunks, m.language, list(m.token_ids))


@dataclass(frozen=True)
class TranscriptionPiece:
    """One streamed piece of a transcription: the segment (Whisper) or chunk (CTC) that became
    final; the last one also carries the whole transcription and the metadata."""

    chunk: TranscriptionChunk
    transcription: Transcription | None = None
    metadata: Metadata | None = None

    @classmethod
    def from_proto(cls, m: inference_pb2.TranscribeStreamResponse) -> TranscriptionPiece:
        return cls(
            TranscriptionChunk.from_proto(m.chunk),
            Transcription.from_proto(m.transcription) if m.HasField("transcription") else None,
            Metadata.from_proto(m.metadata) if m.HasField("metadata") else None,
        )


@dataclass(frozen=True)
class Encoding:
    input_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]
    sequence_ids: list[int | None]

    @classmethod
    def from_proto(cls, m: inference_pb2.Encoding) -> Encoding:
        return cls(
            list(m.input_ids),
            list(m.tokens),
            [(o.start, o.end) for o in m.offsets],
            list(m.special_tokens_mask),
            list(m.attention_mask),
            list(m.token_type_ids),
            [None if s < 0 else s for s in m.sequence_ids],
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: list[int]
    task: str
    labels: list[str]
    precision: str
    execution_provider: str
    available_precisions: list[str]
    max_input_length: int
    state: str
    state_reason: str
    pooling: str
    hidden_size: int
    mask_token: str
    architecture: str
    max_batch_size: int
    max_batch_tokens: int
    max_inputs_per_request: int  # more in one request is refused (INVALID_ARGUMENT)
    max_response_bytes: int  # the server's largest response; an Encode that could not fit is refused
    serving_cpu_features: list[str]  # the serving machine's kernel-selecting CPU features
    refused_variants: dict[str, list[str]]  # precision -> the gates its probes missed at load here

    @classmethod
    def from_proto(cls, m: models_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            version=m.version,
            versions=list(m.versions),
            task=short_name(common_pb2.Task, m.task),
            labels=list(m.labels),
            precision=short_name(common_pb2.Precision, m.precision),
            execution_provider=m.execution_provider,
            available_precisions=[short_name(common_pb2.Precision, p) for p in m.available_precisions],
            max_input_length=m.max_input_length,
            state=short_name(models_pb2.ModelState, m.state),
            state_reason=m.state_reason,
            pooling=short_name(common_pb2.Pooling, m.pooling),
            hidden_size=m.hidden_size,
            mask_token=m.mask_token,
            architecture=m.architecture,
            max_batch_size=m.max_batch_size,
            max_batch_tokens=m.max_batch_tokens,
            max_inputs_per_request=m.max_inputs_per_request,
            max_response_bytes=m.max_response_bytes,
            serving_cpu_features=list(m.serving_machine.cpu_features),
            refused_variants={
                short_name(common_pb2.Precision, r.precision): list(r.load_check.failures) for r in m.refused_variants
            },
        )


def finish_reason(value: int) -> str:
    return short_name(inference_pb2.FinishReason, value)
