"""Transcribe and TranscribeStream for Whisper (speech seq2seq: AutoModelForSpeechSeq2Seq), as
the automatic-speech-recognition pipeline and Whisper's `generate()` do it.

An audio is decoded and resampled (audio.py), cut into 30 s windows when it is longer than one
(the pipeline's chunk_length_s=30 with stride_length_s=5, or the request's), and each window made
into log-mel features. The encoder runs once per window, windows of concurrent requests batched
together (the model's BatchRunner). The decoder then starts from Whisper's prompt,
<|startoftranscript|> <|language|> <|task|> and <|notimestamps|> unless timestamps are asked
for; an empty language is detected as `generate()` does it, by the likeliest language token after
<|startoftranscript|>. Decoding is the generation machinery's (greedy, beams, sampling, the KV
cache, one step per yield so a cancelled call stops within a step), with Whisper's logits
processors added: begin-suppressed tokens and the timestamp rules (generation/logits.py).
The windows' tokens are merged into the text and timestamped segments as the pipeline's
`_decode_asr` does (`merge_windows`). Word timestamps (TIMESTAMPS_WORD, the pipeline's
return_timestamps="word") decode as segment timestamps do, then time each token from the alignment
heads' cross-attention (word_timestamps.py) and group the tokens of each segment into words.

Whisper's prompt tokens come from the version's generation_config.json (lang_to_id,
task_to_id, no_timestamps_token_id, begin_suppress_tokens, max_initial_timestamp_index), which
the export ships; the feature extractor from its preprocessor_config.json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.batching import BatchRunner, RowOutputs
from onnxserve.server.runtime.sessions import CUDA
from onnxserve.server.runtime.stats import DecodingStats, Timings
from onnxserve.server.tasks import speech2text
from onnxserve.server.tasks.audio import FeatureExtractorConfig, decode, read_feature_extractor, whisper_log_mel
from onnxserve.server.tasks.base import ModelResources, Pipeline, require_batch
from onnxserve.server.tasks.generation import logits
from onnxserve.server.tasks.generation.cache import new_cache
from onnxserve.server.tasks.generation.causal import Timed
from onnxserve.server.tasks.generation.cross import CrossGraph
from onnxserve.server.tasks.generation.decoding import decode as decode_steps
from onnxserve.server.tasks.generation.drivers import Generation, SharedGeneration, SoloGeneration, run
from onnxserve.server.tasks.generation.preparation import RequestSetup
from onnxserve.server.tasks.generation.scheduler import Scheduler
from onnxserve.server.tasks.generation.seq2seq import EncodedSeq2SeqModel
from onnxserve.server.tasks.registration import SEQ2SEQ_GRAPHS, ExportSpec, KServeAudio, TaskRegistration
from onnxserve.server.tasks.word_timestamps import ALIGNMENT_ROLE, Alignment, Span, Word, token_span, words

from onnxserve.v1 import common_pb2, inference_pb2

GENERATION_CONFIG_FILE = "generation_config.json"
TASKS = ("transcribe", "translate")
#: The pipeline's chunking of long Whisper audio: 30 s windows, a sixth of that as stride.
WINDOW_SECONDS = 30.0
Request = inference_pb2.TranscribeRequest | inference_pb2.TranscribeStreamRequest
#: Language names Whisper's tokenizer accepts besides the codes (transformers' TO_LANGUAGE_CODE).
_LANGUAGE_TABLE = """
    english:en chinese:zh german:de spanish:es russian:ru korean:ko french:fr japanese:ja portuguese:pt
    turkish:tr polish:pl catalan:ca dutch:nl arabic:ar swedish:sv italian:it indonesian:id hindi:hi
    finnish:fi vietnamese:vi hebrew:he ukrainian:uk greek:el malay:ms czech:cs romanian:ro danish:da
    hungarian:hu tamil:ta norwegian:no thai:th urdu:ur croatian:hr bulgarian:bg lithuanian:lt latin:la
    maori:mi malayalam:ml welsh:cy slovak:sk telugu:te persian:fa latvian:lv bengali:bn serbian:sr
    azerbaijani:az slovenian:sl kannada:kn estonian:et macedonian:mk breton:br basque:eu icelandic:is
    armenian:hy nepali:ne mongolian:mn bosnian:bs kazakh:kk albanian:sq swahili:sw galician:gl
    marathi:mr punjabi:pa sinhala:si khmer:km shona:sn yoruba:yo somali:so afrikaans:af occitan:oc
    georgian:ka belarusian:be tajik:tg sindhi:sd gujarati:gu amharic:am yiddish:yi lao:lo uzbek:uz
    faroese:fo haitian_creole:ht pashto:ps turkmen:tk nynorsk:nn maltese:mt sanskrit:sa luxembourgish:lb
    myanmar:my tibetan:bo tagalog:tl malagasy:mg assamese:as tatar:tt hawaiian:haw lingala:ln hausa:ha
    bashkir:ba javanese:jw sundanese:su cantonese:yue burmese:my valencian:ca flemish:nl haitian:ht
    letzeburgesch:lb pushto:ps panjabi:pa moldavian:ro moldovan:ro sinhalese:si castilian:es mandarin:zh
"""
_LANGUAGE_CODES = dict(pair.split(":") for pair in _LANGUAGE_TABLE.split())


@dataclass(frozen=True)
class WhisperPrompts:
    """Whisper's special tokens, from generation_config.json: what its decoder starts from and
    what its timestamps are."""

    start: int  # <|startoftranscript|>
    end: int  # <|endoftext|>
    no_timestamps: int  # <|notimestamps|>; the timestamp tokens follow it
    languages: dict[str, int]  # language code ("en") -> its token; empty for English-only models
    tasks: dict[str, int]  # "transcribe" / "translate" -> its token
    begin_suppress: tuple[int, ...]
    max_initial_timestamp_index: int | None
    has_alignment_heads: bool = False  # generation_config.json names alignment_heads (word timestamps)

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @classmethod
    def read(cls, directory: Path) -> WhisperPrompts:
        path = directory / GENERATION_CONFIG_FILE
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            end = config["eos_token_id"]
            return cls(
                start=config["decoder_start_token_id"],
                end=end[0] if isinstance(end, list) else end,
                no_timestamps=config["no_timestamps_token_id"],
                languages={token.strip("<|>"): token_id for token, token_id in config.get("lang_to_id", {}).items()},
                tasks=dict(config.get("task_to_id", {})),
                begin_suppress=tuple(config.get("begin_suppress_tokens") or ()),
                max_initial_timestamp_index=config.get("max_initial_timestamp_index"),
                has_alignment_heads=bool(config.get("alignment_heads")),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"cannot read Whisper's tokens from {path}: {error}") from error

    def language_code(self, language: str) -> str | None:
        """The request's language as a code of this model; None to detect it."""
        if not language:
            return None
        if not self.languages:
            raise InvalidArgument("this Whisper model is English-only: it takes no language")
        wanted = language.strip().lower()
        code = wanted if wanted in self.languages else _LANGUAGE_CODES.get(wanted.replace(" ", "_"))
        if code not in self.languages:
            raise InvalidArgument(
                f"unknown language {language!r}: give a code such as 'en' or a name such as 'english'"
            )
        return code

    def task(self, task: str) -> str:
        if task and task not in TASKS:
            raise InvalidArgument(f"unknown task {task!r}: use 'transcribe' or 'translate'")
        if task == "translate" and "translate" not in self.tasks:
            raise InvalidArgument("this Whisper model is English-only: it does not translate")
        return task or "transcribe"

    def prompt(self, language: str | None, task: str, timestamps: bool) -> list[int]:
        """generate()'s decoder_input_ids: the start, then language and task (multilingual
        models), then <|notimestamps|> unless timestamps are wanted."""
        tokens = [self.start]
        if self.languages:
            tokens += [self.languages[language], self.tasks[task]]
        if not timestamps:
            tokens.append(self.no_timestamps)
        return tokens

    def processors(self, begin_index: int, timestamps: bool) -> logits.LogitsChain:
        """Whisper's processors, applied before the checkpoint's suppressed tokens and the rest,
        as generate() orders them."""
        chain: list[logits.LogitsProcessor] = []
        if self.begin_suppress:
            chain.append(logits.SuppressTokensAtBegin(self.begin_suppress, begin_index))
        if timestamps:
            index = self.max_initial_timestamp_index
            chain.append(
                logits.WhisperTimestamps(self.timestamp_begin, self.no_timestamps, self.end, begin_index, index)
            )
        return logits.LogitsChain(tuple(chain))


@dataclass(frozen=True)
class Window:
    """One window of an audio: its log-mel features, the number of their frames that hold audio
    (the rest pads it to 30 s; word timestamps look at those only), and (for chunked audio) the
    pipeline's stride in seconds: the window's length, and the overlap on its left and right."""

    features: np.ndarray
    frames: int
    stride: tuple[float, float, float] | None = None

    def __len__(self) -> int:  # one row of the encoder's batch
        return 1


@dataclass(frozen=True)
class Options:
    """A request's checked options."""

    language: str | None
    task: str
    timestamps: bool  # timestamp tokens are decoded (segment and word timestamps)
    words: bool  # the chunks are words
    chunk_length_s: float
    stride_length_s: float
    parameters: inference_pb2.GenerationParameters


@dataclass
class Segment:
    """One of the pipeline's `chunks`: text with its start and end in seconds (end None: not closed)."""

    text: str = ""
    start: float | None = None
    end: float | None = None
    words: list[Word] = field(default_factory=list)  # with word timestamps

    def message(self) -> inference_pb2.TranscriptionChunk:
        chunk = inference_pb2.TranscriptionChunk(text=self.text, start=self.start)
        if self.end is not None:
            chunk.end = self.end
        return chunk


def _with_starts(segments: list[Segment]) -> list[Segment]:
    """A segment the model never opened with a timestamp (the pipeline's start None: text after
    the last closed segment) starts where the previous one ended, or at 0."""
    previous_end = 0.0
    for segment in segments:
        if segment.start is None:
            segment.start = previous_end
        previous_end = segment.end if segment.end is not None else segment.start
    return segments


@dataclass
class _Merge:
    """The state of `merge_windows` between windows (the pipeline's `_decode_asr` locals)."""

    segments: list[Segment] = field(default_factory=list)
    segment: Segment = field(default_factory=Segment)
    pending: list[list[int]] = field(default_factory=list)  # text token runs not yet resolved
    pending_spans: list[list[Span]] = field(default_factory=list)  # their tokens' spans (word timestamps)
    time_offset: float = 0.0
    skip: bool = False


@dataclass(frozen=True)
class MergeWindow:
    """One window's part in `merge_windows`: its generated tokens, its stride (chunked audio), and
    with word timestamps each token's time in seconds within the window."""

    tokens: list[int]
    stride: tuple[float, float, float] | None = None
    times: np.ndarray | None = None


def merge_windows(
    windows: Sequence[MergeWindow],
    prompts: WhisperPrompts,
    decode_text: Callable[[list[int]], str],
    time_precision: float,
    language: str = "",
) -> list[Segment]:
    """The pipeline's `_decode_asr`: each window's generated tokens (and stride) in order, to
    segments. Timestamp pairs close segments (times offset by where the window starts); the text
    of overlapping windows is joined at their longest common token run (with word timestamps, of
    tokens whose spans are in order too); special tokens are dropped. Without timestamps the whole
    text is one segment. With token times, each segment's words (in `language`'s writing)."""
    state = _Merge()
    resolve = partial(_resolve, state, decode_text, language)
    for window in windows:
        _merge_window(state, window, prompts, time_precision, resolve)
    if state.pending:
        resolve()
    return _with_starts(state.segments)


def _resolve(state: _Merge, decode_text: Callable[[list[int]], str], language: str) -> None:
    """Closes the current segment: the pending runs joined into its text (and words)."""
    tokens, spans = longest_common_sequence(state.pending, state.pending_spans)
    state.segment.text = decode_text(tokens)
    if state.pending_spans:
        state.segment.words = words(tokens, spans, decode_text, language)
    state.segments.append(state.segment)


def _merge_window(
    state: _Merge, window: MergeWindow, prompts: WhisperPrompts, time_precision: float, resolve: Callable[[], None]
) -> None:
    tokens, stride = window.tokens, window.stride
    timestamp_begin = prompts.timestamp_begin
    first_timestamp, last_timestamp = timestamp_begin, None
    current_max, earlier_segments, penultimate = 0.0, 0.0, 0.0
    if stride is not None:
        length, left, right = stride
        state.time_offset -= left
        right_stride_start = length - right
        if left:
            first_timestamp = left / time_precision + timestamp_begin
        if right:
            for token in reversed(tokens):
                if token >= timestamp_begin:
                    if last_timestamp is not None and (token - timestamp_begin) * time_precision < right_stride_start:
                        break
                    last_timestamp = token
    current: list[int] = []
    current_spans: list[Span] = []
    for index, token in enumerate(tokens):
        if token < timestamp_begin:
            if token < prompts.end:  # text; special tokens (language, task, end) carry no text
                current.append(token)
                if window.times is not None:
                    current_spans.append(token_span(window.times, index, state.time_offset))
            continue
        timestamp = (token - timestamp_begin) * time_precision
        if timestamp < current_max:  # the model's timestamps restarted: a 30 s segment passed
            single_ending = index >= 2 and not (
                tokens[index - 1] >= timestamp_begin and tokens[index - 2] >= timestamp_begin
            )
            if single_ending:
                earlier_segments += time_precision * 1500
            else:
                current_max = penultimate
                earlier_segments += penultimate
        penultimate, current_max = current_max, timestamp
        time = round(timestamp + state.time_offset + earlier_segments, 2)
        if last_timestamp and token >= last_timestamp:
            state.skip = True
        elif state.skip or (state.pending and token < first_timestamp):
            state.skip = False
        elif state.segment.start is None:
            state.segment.start = time
        elif time != state.segment.start:
            state.segment.end = time
            _hold(state, current, current_spans, window.times is not None)
            resolve()
            state.pending, state.pending_spans, state.segment = [], [], Segment()
            current, current_spans = [], []
    if stride is not None:
        state.time_offset += stride[0] - stride[2]
    if current:
        _hold(state, current, current_spans, window.times is not None)
    elif not any(state.pending):
        state.segment, state.pending, state.pending_spans = Segment(), [], []


def _hold(state: _Merge, run: list[int], spans: list[Span], timed: bool) -> None:
    """A run of text tokens (and their spans) left to resolve with the next window's overlap."""
    state.pending.append(run)
    if timed:
        state.pending_spans.append(spans)


def longest_common_sequence(
    runs: Sequence[list[int]], spans: Sequence[list[Span]] = ()
) -> tuple[list[int], list[Span]]:
    """The pipeline's `_find_longest_common_sequence` (whisper's): consecutive token runs joined
    where they overlap best, each side keeping its half of the overlap. With the runs' token
    spans (word timestamps), a token matches only where its span in the left run is not after
    its span in the right one, and the spans are joined as the tokens are."""
    left, left_spans = runs[0], list(spans[0]) if spans else []
    total: list[int] = []
    total_spans: list[Span] = []
    for index, right in enumerate(runs[1:], start=1):
        best, best_span = 0.0, (len(left), len(left), 0, 0)
        for shift in range(1, len(left) + len(right)):
            left_start, left_stop = max(0, len(left) - shift), min(len(left), len(left) + len(right) - shift)
            right_start, right_stop = max(0, shift - len(left)), min(len(right), shift)
            same = np.array(left[left_start:left_stop]) == np.array(right[right_start:right_stop])
            if spans:
                pairs = zip(left_spans[left_start:left_stop], spans[index][right_start:right_stop], strict=True)
                same &= np.array([a <= b for a, b in pairs], dtype=bool)
            matches = int(np.sum(same))
            score = matches / shift + shift / 10000.0
            if matches > 1 and score > best:
                best, best_span = score, (left_start, left_stop, right_start, right_stop)
        left_start, left_stop, right_start, right_stop = best_span
        left_middle, right_middle = (left_start + left_stop) // 2, (right_start + right_stop) // 2
        total.extend(left[:left_middle])
        left = right[right_middle:]
        if spans:
            total_spans.extend(left_spans[:left_middle])
            left_spans = list(spans[index][right_middle:])
    return total + left, total_spans + left_spans


class SpeechRecognitionPipeline(Pipeline[Any]):
    """Whisper: windows through the encoder's batcher, then decoding on the generation executor."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        if resources.directory is None or self.tokenizer is None:
            raise ModelLoadError(f"model {self.name!r}: Whisper needs its folder's configuration files and tokenizer")
        self.require_graphs("a Whisper model", "encoder", "decoder")
        self.features: FeatureExtractorConfig = read_feature_extractor(resources.directory)
        self.prompts = WhisperPrompts.read(resources.directory)
        self.setup = RequestSetup(self.manifest, self.tokenizer.tokenizer, seq2seq=True)
        self.settings = resources.settings
        self.stats = DecodingStats()
        self.scheduler = self._scheduler()
        self.runner: BatchRunner | None = None
        # Seconds per timestamp step: the window over the encoder's positions (30 s / 1500 = 0.02 s);
        # the encoder halves the spectrogram's frames.
        frames = self.features.n_samples // self.features.hop_length
        self.time_precision = self.features.chunk_length / (frames // 2)
        aligning = self.sessions.get(ALIGNMENT_ROLE)
        self.alignment = None if aligning is None else Alignment(aligning, self.time_precision)

    def open(self) -> None:
        # Every window is 30 s of features, nothing is padded: batchmates cannot change a window's states.
        self.runner = BatchRunner(self.name, self._encode, self.settings)

    def _scheduler(self) -> Scheduler | None:
        """Continuous batching (calls share decode steps) on the fused decoder graphs that Whisper
        exports carry beside optimum's decoder (docs/decoder-graph.md, "Whisper"): on the CPU, with
        max_generation_rows > 0; else each call decodes alone on optimum's decoder."""
        decoder, cross = self.sessions.get("fused_decoder"), self.sessions.get("cross_attention")
        rows = self.settings.max_generation_rows
        if decoder is None or cross is None or rows <= 0 or decoder.provider == CUDA:
            return None
        graph = CrossGraph(decoder, cross)
        return Scheduler(self.name, graph, rows, self.settings.max_queue_size, self.setup.context, self.stats)

    async def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.runner is not None:
            await self.runner.close()

    def _encode(self, windows: Sequence[Window]) -> list[RowOutputs]:
        hidden = self.sessions["encoder"].run({"input_features": np.stack([w.features for w in windows])})
        return [{"last_hidden_state": row} for row in hidden["last_hidden_state"]]

    async def warm_up(self) -> None:
        silence = np.zeros(self.features.sampling_rate, dtype=np.float32)
        await self._encoder().infer([self._window(silence)], Timings())

    def _encoder(self) -> BatchRunner:
        if self.runner is None:
            raise RuntimeError(f"the pipeline of model {self.name!r} was not opened")
        return self.runner

    # --- the request --------------------------------------------------------------------------

    def options(self, request: Request) -> Options:
        if request.return_timestamps == inference_pb2.TIMESTAMPS_CHAR:
            raise InvalidArgument("character timestamps are for CTC models; Whisper gives TIMESTAMPS_SEGMENT")
        words = request.return_timestamps == inference_pb2.TIMESTAMPS_WORD
        if words:
            self._aligner()
        for name in ("chunk_length_s", "stride_length_s"):
            value = getattr(request, name)
            if not np.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number of seconds, at least 0; got {value}")
        chunk = request.chunk_length_s
        if chunk > WINDOW_SECONDS:
            raise InvalidArgument(f"chunk_length_s is {chunk:g}: Whisper's window is {WINDOW_SECONDS:g} s at most")
        stride = request.stride_length_s or (chunk or WINDOW_SECONDS) / 6
        if chunk and chunk <= 2 * stride:
            raise InvalidArgument(f"chunk_length_s {chunk:g} must be longer than twice stride_length_s {stride:g}")
        return Options(
            language=self.prompts.language_code(request.language),
            task=self.prompts.task(request.task),
            timestamps=words or request.return_timestamps == inference_pb2.TIMESTAMPS_SEGMENT,
            words=words,
            chunk_length_s=chunk,
            stride_length_s=stride,
            parameters=request.parameters,
        )

    def windows(self, audio: inference_pb2.Audio, index: int, options: Options) -> list[Window]:
        """The audio's windows: the whole audio when it fits one and no chunking is asked for,
        else the pipeline's chunk_iter (chunks of chunk_length_s every chunk - 2 x stride)."""
        rate = self.features.sampling_rate
        samples = decode(audio, index, rate, self.settings.max_audio_seconds)
        if not options.chunk_length_s and len(samples) <= self.features.n_samples:
            return [self._window(samples)]
        length = round((options.chunk_length_s or WINDOW_SECONDS) * rate)
        stride = round(options.stride_length_s * rate)
        windows = []
        for start in range(0, len(samples), length - 2 * stride):
            piece = samples[start : start + length]
            last = start + length >= len(samples)
            left, right = (0 if start == 0 else stride), (0 if last else stride)
            if len(piece) > left:
                seconds = (len(piece) / rate, left / rate, right / rate)
                windows.append(self._window(piece, seconds))
            if last:
                break
        return windows

    def _window(self, samples: np.ndarray, stride: tuple[float, float, float] | None = None) -> Window:
        # The frames the feature extractor's attention mask keeps: ceil(samples / hop), 30 s at most.
        hop, most = self.features.hop_length, self.features.n_samples // self.features.hop_length
        return Window(whisper_log_mel(samples, self.features), min(-(-len(samples) // hop), most), stride)

    def _aligner(self) -> Alignment:
        """The alignment graph, or INVALID_ARGUMENT saying why word timestamps cannot be served."""
        if self.alignment is not None:
            return self.alignment
        if self.prompts.has_alignment_heads:
            raise InvalidArgument(
                "word timestamps need the alignment heads' graph, which this version lacks (it was exported "
                "before onnxserve wrote one): re-export the model, or ask for TIMESTAMPS_SEGMENT"
            )
        raise InvalidArgument(
            "word timestamps need Whisper's alignment heads, and this model's generation_config.json names "
            "none (alignment_heads): ask for TIMESTAMPS_SEGMENT"
        )

    async def _prepare(
        self, audios: Sequence[inference_pb2.Audio], options: Options, timings: Timings
    ) -> tuple[list[list[Window]], np.ndarray]:
        """Each audio's windows, and every window's encoder states (through the shared batcher)."""
        per_audio = await self._blocking(
            lambda: timings.timed("tokenization", lambda: [self.windows(a, i, options) for i, a in enumerate(audios)])
        )
        flat = [window for windows in per_audio for window in windows]
        rows = await self._encoder().infer(flat, timings)
        return per_audio, np.stack([row["last_hidden_state"] for row in rows])

    def start(self, hidden: np.ndarray, options: Options, timings: Timings) -> tuple[Generation, list[str]]:
        """The decoding of every window (on the generation executor), and each window's language."""
        timed = lambda work: timings.timed("inference", work)  # noqa: E731
        codes = (
            [options.language] * len(hidden)
            if options.language or not self.prompts.languages
            else self.detect(hidden, timed)
        )
        prompts = np.array([self.prompts.prompt(code, options.task, options.timestamps) for code in codes])
        request = self.setup.from_encoder_inputs(
            {"encoder_hidden_states": hidden}, options.parameters, timings, prompts.shape[1]
        )
        whisper = self.prompts.processors(prompts.shape[1], options.timestamps)
        request.decoding = replace(request.decoding, processors=whisper + request.decoding.processors)
        languages = [c or "" for c in codes]
        # Beam search reorders its rows every step: it decodes alone, as for causal LMs.
        if self.scheduler is not None and request.settings.num_beams == 1 and self.scheduler.fits(len(hidden)):
            request.token_ids = prompts.tolist()  # each row's first decoder tokens
            return SharedGeneration(request, timings, self.scheduler, prompts, encoder_states=hidden), languages
        model = EncodedSeq2SeqModel(self.sessions, hidden, prompts, timed)
        steps = decode_steps(model, request.outputs, request.decoding)
        return SoloGeneration(request, timings, steps, model.release, self.stats), languages

    def detect(self, hidden: np.ndarray, timed: Timed) -> list[str]:
        """Each window's language, as generate() detects it: the likeliest language token after
        <|startoftranscript|> alone."""
        decoder = self.sessions["decoder"]
        cache = new_cache(decoder, len(hidden))
        cache.hold({"encoder_hidden_states": hidden})
        start = np.full((len(hidden), 1), self.prompts.start, dtype=np.int64)
        scores = timed(lambda: cache.run(decoder, {"input_ids": start, "use_cache_branch": np.array([False])}))
        cache.clear()
        codes = list(self.prompts.languages)
        ids = np.array([self.prompts.languages[code] for code in codes])
        return [codes[i] for i in scores[:, ids].argmax(axis=-1)]

    def transcription(
        self,
        windows: Sequence[Window],
        generated: Sequence[Sequence[int]],
        languages: Sequence[str],
        times: Sequence[np.ndarray] | None = None,
    ) -> tuple[inference_pb2.Transcription, list[Segment]]:
        """One audio's transcription from its windows' generated tokens (with the end token they
        stopped at) and, for word timestamps, their tokens' times."""
        tokens = [self._generated(ids) for ids in generated]
        merged = [
            MergeWindow(ids, window.stride, None if times is None else times[index])
            for index, (ids, window) in enumerate(zip(tokens, windows, strict=True))
        ]
        segments = merge_windows(merged, self.prompts, self.tokenizer.decode, self.time_precision, languages[0])
        result = inference_pb2.Transcription(
            text="".join(s.text for s in segments), language=languages[0], token_ids=[t for ids in tokens for t in ids]
        )
        return result, segments

    def _generated(self, tokens: Sequence[int]) -> list[int]:
        """generate()'s ids: without the end of text it stopped at."""
        return list(tokens[:-1]) if tokens and tokens[-1] == self.prompts.end else list(tokens)

    def token_times(
        self,
        hidden: np.ndarray,
        windows: Sequence[Window],
        generated: Sequence[Sequence[int]],
        languages: Sequence[str],
        options: Options,
    ) -> list[np.ndarray]:
        """Each window's token times (word timestamps): the alignment graph over its prompt and
        generated tokens."""
        aligner = self._aligner()
        return [
            aligner.token_times(states, self.prompts.prompt(language or None, options.task, True), ids, window.frames)
            for states, window, ids, language in zip(hidden, windows, generated, languages, strict=True)
        ]

    # --- the RPCs -----------------------------------------------------------------------------

    async def run(
        self, rpc: str, request: inference_pb2.TranscribeRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.TranscribeResponse:
        require_batch(request.audios, "audios")
        options = self.options(request)
        per_audio, hidden = await self._prepare(request.audios, options, timings)
        loop = asyncio.get_running_loop()
        generation, languages = await loop.run_in_executor(
            self.executors.generation, self.start, hidden, options, timings
        )
        decoded = await run(generation, self.executors.generation)
        generated = [list(result.token_ids) for result in decoded.results]
        timings.tokens = sum(len(self._generated(ids)) for ids in generated)
        times = None
        if options.words:
            flat = [window for windows in per_audio for window in windows]
            align = partial(self.token_times, hidden, flat, generated, languages, options)
            times = await loop.run_in_executor(self.executors.generation, timings.timed, "inference", align)
        response, first = inference_pb2.TranscribeResponse(), 0
        for windows in per_audio:
            last = first + len(windows)
            result, segments = self.transcription(
                windows, generated[first:last], languages[first:last], None if times is None else times[first:last]
            )
            if options.timestamps:
                result.chunks.extend(_chunks(segments, options.words))
            response.results.append(result)
            first = last
        return response

    async def stream(
        self, rpc: str, request: inference_pb2.TranscribeStreamRequest, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[Any, bool]]:
        """One message per segment (per word with word timestamps) once no later token can change
        it, then the transcription. A cancelled call closes the decoding within a step, as
        GenerateStream."""
        if not request.HasField("audio"):
            raise InvalidArgument("the request holds no audio: set audio")
        options = self.options(request)
        (windows,), hidden = await self._prepare([request.audio], options, timings)
        loop = asyncio.get_running_loop()
        generation, languages = await loop.run_in_executor(
            self.executors.generation, self.start, hidden, options, timings
        )
        sent, times = 0, []  # times: word timestamps' token times of the windows finished so far
        # Every step, not only those that print text: a later window's segments become final while
        # the first window's text has ended. Closing the steps (a cancelled call) frees the cache.
        # streaming=False: the segments are read from the outputs here, not from text messages.
        async with aclosing(generation.steps(self.executors.generation, streaming=False)) as steps:
            async for _ in steps:
                if options.words and _finished(generation) > len(times):
                    times += await self._times_of_finished(generation, hidden, windows, languages, options, times)
                final = _chunks(
                    self._final_segments(generation, windows, languages, times, options.words), options.words
                )
                for chunk in final[sent:]:
                    yield inference_pb2.TranscribeStreamResponse(chunk=chunk), False
                sent = max(sent, len(final))
        generated = [list(output.tokens) for output in generation.outputs]
        timings.tokens = sum(len(self._generated(ids)) for ids in generated)
        result, segments = self.transcription(windows, generated, languages, times if options.words else None)
        chunks = _chunks(segments, options.words)
        if options.timestamps:
            result.chunks.extend(chunks)
        for chunk in chunks[sent:]:
            yield inference_pb2.TranscribeStreamResponse(chunk=chunk), False
        yield inference_pb2.TranscribeStreamResponse(transcription=result), True

    async def _times_of_finished(
        self,
        generation: Generation,
        hidden: np.ndarray,
        windows: Sequence[Window],
        languages: Sequence[str],
        options: Options,
        known: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """The token times of the windows finished since those `known`, in order."""
        new = slice(len(known), _finished(generation))
        generated = [list(output.tokens) for output in generation.outputs[new]]
        align = partial(self.token_times, hidden[new], windows[new], generated, languages[new], options)
        return await asyncio.get_running_loop().run_in_executor(self.executors.generation, align)

    def _final_segments(
        self,
        generation: Generation,
        windows: Sequence[Window],
        languages: Sequence[str],
        times: Sequence[np.ndarray],
        words: bool,
    ) -> list[Segment]:
        """The segments no later token can change: those closed in the windows decoded so far
        (all finished ones in order, and the last window while it decodes: no window follows it to
        overlap; with word timestamps, the finished windows whose tokens are timed), except the
        last, which the next window's overlap may still extend."""
        ended = generation.done  # before the tokens: a shared generation's thread may end it meanwhile
        outputs = generation.outputs
        done = _finished(generation)
        decoding = min(done + 1, len(outputs)) if done == len(outputs) - 1 else done
        count = len(times) if words else decoding
        if count == 0:
            return []
        generated = [list(output.tokens) for output in outputs[:count]]
        _, segments = self.transcription(windows[:count], generated, languages[:count], times if words else None)
        return segments if ended else segments[:-1]


def _finished(generation: Generation) -> int:
    """How many of the windows, from the first, have finished decoding."""
    outputs = generation.outputs
    return next((i for i, output in enumerate(outputs) if not output.finished), len(outputs))


def _chunks(segments: Sequence[Segment], words: bool) -> list[inference_pb2.TranscriptionChunk]:
    """The contract's chunks: the segments, or with word timestamps their words."""
    if words:
        return [
            inference_pb2.TranscriptionChunk(text=word.text, start=word.start, end=word.end)
            for segment in segments
            for word in segment.words
        ]
    return [segment.message() for segment in segments]


def speech_seq2seq_pipeline(resources: ModelResources) -> Pipeline[Any]:
    """The task's pipeline for the model: Speech2Text's (speech2text.py) for its checkpoints,
    else Whisper's."""
    if resources.manifest.model_type == speech2text.MODEL_TYPE:
        return speech2text.Speech2TextPipeline(resources)
    return SpeechRecognitionPipeline(resources)


REGISTRATION = TaskRegistration(
    name="automatic-speech-recognition",
    task=common_pb2.TASK_AUTOMATIC_SPEECH_RECOGNITION,
    pipeline=speech_seq2seq_pipeline,
    rpcs=frozenset({"Transcribe", "TranscribeStream"}),
    kserve_audio=KServeAudio("Transcribe"),
    export=ExportSpec(
        "automatic-speech-recognition-with-past",
        "AutoModelForSpeechSeq2Seq",
        graphs=SEQ2SEQ_GRAPHS,
        generation_config=True,
        fused_decoder=True,  # Whisper's (export/whisper_graph.py), beside optimum's decoder
    ),
    inputs="text and audio",
)
