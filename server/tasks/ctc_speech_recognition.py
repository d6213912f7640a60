"""Transcribe and TranscribeStream for CTC models (wav2vec2, HuBERT: AutoModelForCTC), as the
automatic-speech-recognition pipeline does it for them: the waveform normalized as the feature
extractor does, the model's logits, greedy CTC decoding (argmax per frame, repeats collapsed, the
blank (pad) token dropped, the word delimiter turned into a space), character and word offsets
in seconds (offset x inputs_to_logits_ratio / sampling_rate), and long audio cut into chunks with
stride whose logits are merged by dropping the stride frames.

The pipeline decodes with Wav2Vec2CTCTokenizer, which is not a `tokenizers` tokenizer; the export
ships its id -> token table and decoding options instead (CTC_VOCABULARY_FILE), and
`CTCVocabulary` does what the tokenizer's decode does with them: greedy decoding needs no more."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.tasks.audio import AudioPipeline, InputValues
from onnxserve.server.tasks.base import ModelResources, Prepared, RowOutputs, require_batch
from onnxserve.server.tasks.registration import ExportSpec, KServeAudio, TaskRegistration

from onnxserve.v1 import common_pb2, inference_pb2

#: The file the export writes the CTC vocabulary and decoding options into.
CTC_VOCABULARY_FILE = "ctc_vocabulary.json"
#: transformers' clean_up_tokenization: spaces before punctuation and English contractions.
_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip
Request = inference_pb2.TranscribeRequest | inference_pb2.TranscribeStreamRequest


@dataclass(frozen=True)
class Offset:
    """A character or word and the logit frames it spans, [start, end)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class CTCVocabulary:
    """Wav2Vec2CTCTokenizer's decoding (decode with output_char_offsets, skip_special_tokens
    False, as the pipeline calls it for CTC models), from the table the export writes."""

    tokens: tuple[str, ...]  # by id, for every id the model's logits cover
    pad_token: str  # the CTC blank
    word_delimiter_token: str
    replace_word_delimiter_char: str = " "
    do_lower_case: bool = False
    clean_up_tokenization_spaces: bool = False
    inputs_to_logits_ratio: int = 1  # waveform samples per logit frame

    @classmethod
    def read(cls, directory: Path) -> CTCVocabulary:
        path = directory / CTC_VOCABULARY_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{**values, "tokens": tuple(values["tokens"])})
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ModelLoadError(f"cannot read the CTC vocabulary {path}: {error}") from error

    def char_offsets(self, ids: Sequence[int]) -> list[Offset]:
        """Repeats collapsed, blanks dropped, the delimiter replaced: each character with the
        frames its repeats span."""
        offsets, frame = [], 0
        for token, repeats in ((token, len(list(run))) for token, run in groupby(self.tokens[i] for i in ids)):
            if token != self.pad_token:
                char = self.replace_word_delimiter_char if token == self.word_delimiter_token else token
                offsets.append(Offset(char, frame, frame + repeats))
            frame += repeats
        return offsets

    def text(self, chars: Sequence[Offset]) -> str:
        text = "".join(char.text for char in chars).strip()
        if self.do_lower_case:
            text = text.lower()
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEAN_UPS:
                text = text.replace(before, after)
        return text

    def word_offsets(self, chars: Sequence[Offset]) -> list[Offset]:
        """Runs of characters between delimiters, as the tokenizer's _get_word_offsets groups them."""
        words = []
        for is_space, run in groupby(chars, key=lambda char: char.text == self.replace_word_delimiter_char):
            if not is_space:
                run = list(run)
                words.append(Offset("".join(char.text for char in run), run[0].start, run[-1].end))
        return words


@dataclass(frozen=True)
class Chunk:
    """One piece of an audio as the pipeline's chunk_iter cuts it: its input, and which of its
    logit frames to keep (the stride frames are dropped)."""

    values: InputValues
    keep_from: int = 0  # first kept frame
    keep_to: int | None = None  # one past the last kept frame; None: to the end


@dataclass(frozen=True)
class Chunking:
    """The pipeline's chunk_len, stride_left and stride_right, in samples, aligned to the logit frames."""

    length: int
    left: int
    right: int


class CTCSpeechRecognitionPipeline(AudioPipeline[Request]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.vocabulary = CTCVocabulary.read(resources.directory)

    # --- preprocessing ------------------------------------------------------------------------

    def preprocess(self, request: inference_pb2.TranscribeRequest) -> Prepared:
        require_batch(request.audios, "audios")
        chunking = self._check(request)
        chunks = [self.chunks(waveform, chunking) for waveform in self.waveforms(request.audios)]
        return Prepared([chunk.values for pieces in chunks for chunk in pieces], {"chunks": chunks})

    def _check(self, request: Request) -> Chunking | None:
        """Refuses what CTC models do not take; the chunking asked for, if any."""
        if request.language or request.task:
            raise InvalidArgument(
                f"model {self.name!r} is a CTC model: it takes no language or task (those are Whisper's)"
            )
        if request.HasField("parameters"):
            raise InvalidArgument(
                f"model {self.name!r} is a CTC model: it decodes greedily and takes no generation parameters"
            )
        if request.return_timestamps == inference_pb2.TIMESTAMPS_SEGMENT:
            raise InvalidArgument(
                "CTC models give character or word timestamps: ask for TIMESTAMPS_CHAR or TIMESTAMPS_WORD"
            )
        return self.chunking(request.chunk_length_s, request.stride_length_s)

    def chunking(self, chunk_length_s: float, stride_length_s: float) -> Chunking | None:
        """The pipeline's chunk and stride lengths in samples, rounded to whole logit frames; None
        without chunk_length_s (the whole audio in one run, as the pipeline does)."""
        for name, value in (("chunk_length_s", chunk_length_s), ("stride_length_s", stride_length_s)):
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number of seconds, at least 0; got {value}")
        if not chunk_length_s:
            if stride_length_s:
                raise InvalidArgument("stride_length_s needs chunk_length_s: without it the audio is not chunked")
            return None
        stride_length_s = stride_length_s or chunk_length_s / 6
        align = self.vocabulary.inputs_to_logits_ratio
        in_frames = lambda seconds: round(seconds * self.sampling_rate / align) * align  # noqa: E731
        chunking = Chunking(in_frames(chunk_length_s), in_frames(stride_length_s), in_frames(stride_length_s))
        if chunking.length <= chunking.left + chunking.right:
            raise InvalidArgument(
                f"chunk_length_s {chunk_length_s:g} must be longer than twice stride_length_s {stride_length_s:g}"
            )
        return chunking

    def chunks(self, waveform: np.ndarray, chunking: Chunking | None) -> list[Chunk]:
        """The pipeline's chunk_iter: chunks of chunking.length samples every length - left -
        right samples, each normalized on its own; the stride on each inner side is dropped from
        its logits (rescale_stride's rounding)."""
        if chunking is None:
            return [Chunk(self.input_values(waveform))]
        pieces, total = [], len(waveform)
        for start in range(0, total, chunking.length - chunking.left - chunking.right):
            piece = waveform[start : start + chunking.length]
            is_last = start + chunking.length >= total
            left = 0 if start == 0 else chunking.left
            right = 0 if is_last else chunking.right
            if len(piece) > left:
                frames = round(len(piece) / self.vocabulary.inputs_to_logits_ratio)
                keep_from = round(left / len(piece) * frames)
                keep_to = frames - round(right / len(piece) * frames)
                pieces.append(Chunk(self.input_values(piece), keep_from, keep_to))
            if is_last:
                break
        return pieces

    # --- postprocessing -----------------------------------------------------------------------

    def postprocess(
        self, request: inference_pb2.TranscribeRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.TranscribeResponse:
        response = inference_pb2.TranscribeResponse()
        rows = iter(outputs)
        for pieces in prepared.context["chunks"]:
            ids = np.concatenate([self.kept_ids(piece, next(rows)) for piece in pieces])
            response.results.append(self.transcription(ids, request.return_timestamps))
        return response

    @staticmethod
    def kept_ids(chunk: Chunk, row: RowOutputs) -> np.ndarray:
        """The chunk's greedy ids, its stride frames dropped."""
        return row["logits"].argmax(axis=-1)[chunk.keep_from : chunk.keep_to]

    def transcription(self, ids: np.ndarray, timestamps: int) -> inference_pb2.Transcription:
        chars = self.vocabulary.char_offsets(ids.tolist())
        result = inference_pb2.Transcription(text=self.vocabulary.text(chars))
        if timestamps == inference_pb2.TIMESTAMPS_CHAR:
            result.chunks.extend(self._timed(chars))
        elif timestamps == inference_pb2.TIMESTAMPS_WORD:
            result.chunks.extend(self._timed(self.vocabulary.word_offsets(chars)))
        return result

    def _timed(self, offsets: Sequence[Offset]) -> list[inference_pb2.TranscriptionChunk]:
        """The pipeline's chunks: frame offsets to seconds."""
        seconds = self.vocabulary.inputs_to_logits_ratio / self.sampling_rate
        chunk = inference_pb2.TranscriptionChunk
        return [chunk(text=o.text, start=o.start * seconds, end=o.end * seconds) for o in offsets]

    # --- streaming ----------------------------------------------------------------------------

    async def stream(
        self, rpc: str, request: inference_pb2.TranscribeStreamRequest, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[Message, bool]]:
        """One message per chunk, as soon as its logits are in (its text as the chunk's frames
        decode alone; its start and end the audio it covers once the stride is dropped), then the
        whole transcription, decoded from every chunk's frames together as Transcribe does."""
        deadline = None if time_left is None else time.monotonic() + time_left
        pieces = await self._blocking(lambda: timings.timed("tokenization", lambda: self._stream_chunks(request)))
        kept, frame = [], 0
        for piece in pieces:
            remaining = None if deadline is None else deadline - time.monotonic()
            (row,) = await self._runner().infer([piece.values], timings, remaining)
            ids = self.kept_ids(piece, row)
            kept.append(ids)
            yield self._stream_message(ids, frame, request.return_timestamps), False
            frame += len(ids)
        transcription = self.transcription(np.concatenate(kept), request.return_timestamps)
        yield inference_pb2.TranscribeStreamResponse(transcription=transcription), True

    def _stream_chunks(self, request: inference_pb2.TranscribeStreamRequest) -> list[Chunk]:
        if not request.HasField("audio"):
            raise InvalidArgument("the request holds no audio: set audio")
        chunking = self._check(request)
        return self.chunks(self.waveforms([request.audio])[0], chunking)

    def _stream_message(
        self, ids: np.ndarray, first_frame: int, timestamps: int
    ) -> inference_pb2.TranscribeStreamResponse:
        chunk = inference_pb2.TranscriptionChunk(text=self.vocabulary.text(self.vocabulary.char_offsets(ids.tolist())))
        if timestamps:
            seconds = self.vocabulary.inputs_to_logits_ratio / self.sampling_rate
            chunk.start, chunk.end = first_frame * seconds, (first_frame + len(ids)) * seconds
        return inference_pb2.TranscribeStreamResponse(chunk=chunk)


REGISTRATION = TaskRegistration(
    name="ctc-speech-recognition",
    task=common_pb2.TASK_CTC_SPEECH_RECOGNITION,
    pipeline=CTCSpeechRecognitionPipeline,
    rpcs=frozenset({"Transcribe", "TranscribeStream"}),
    kserve_audio=KServeAudio("Transcribe"),
    export=ExportSpec("automatic-speech-recognition", "AutoModelForCTC"),
    inputs="audio",
)
