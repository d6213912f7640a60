"""Typed Python clients over the generated stubs: `Client` (blocking) and `AsyncClient` (asyncio).

Both share one set of typed methods; each client supplies how a call is made. Errors reach the
caller as `grpc.RpcError` (`grpc.aio.AioRpcError` for AsyncClient), status code and details intact."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from onnxserve.client.results import (
    Answer,
    Classification,
    DetectedObject,
    Encoding,
    Entity,
    GeneratedSequence,
    LabelScore,
    MaskCandidate,
    Metadata,
    ModelInfo,
    Reconstruction,
    Response,
    Segment,
    StreamChunk,
    Transcription,
    TranscriptionPiece,
)

from onnxserve.enums import enum_value
from onnxserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
#: No receive limit of the client's own: the server's send limit decides (max_send_message_bytes,
#: GetModel's max_response_bytes; 64 MiB by default), and the server refuses upfront a request whose
#: answer could not fit it. gRPC's default of 4 MiB would throw away answers the server may send.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]
#: What an image may be: a file path, an encoded file's bytes, a Pillow image or a uint8 array
#: (height x width, or height x width x 1, 3 or 4 channels).
ImageSource = str | os.PathLike | bytes | np.ndarray | Any
_RAW_MODES = ("L", "RGB", "RGBA")
#: What an audio may be: a file path or an encoded file's bytes (WAV, FLAC, OGG/Vorbis, MP3), or
#: float samples (mono, or frames x channels) with their sample rate, as a (samples, rate) pair or
#: an array beside the call's sample_rate.
AudioSource = str | os.PathLike | bytes | np.ndarray | tuple[np.ndarray, int]
#: The pipeline's return_timestamps values, as the contract's Timestamps.
_TIMESTAMPS = {
    False: inference_pb2.TIMESTAMPS_UNSPECIFIED,
    True: inference_pb2.TIMESTAMPS_SEGMENT,
    "word": inference_pb2.TIMESTAMPS_WORD,
    "char": inference_pb2.TIMESTAMPS_CHAR,
}


def _enum(enum: Any, name: str | None) -> int:
    """"mean" -> POOLING_MEAN; None -> the UNSPECIFIED default."""
    return 0 if name is None else enum_value(enum, name)


def _response(message: Message, results: list) -> Response:
    return Response(results, Metadata.from_proto(message.metadata))


def image_message(image: ImageSource) -> inference_pb2.Image:
    """An Image message: files and bytes are sent encoded (the server decodes them as the pipelines
    do); Pillow images and arrays as raw pixels, a Pillow image after its EXIF orientation (as the
    pipelines apply it) and in RGB unless it is grayscale, RGB or RGBA already."""
    if isinstance(image, bytes):
        return inference_pb2.Image(data=image)
    if isinstance(image, str | os.PathLike):
        return inference_pb2.Image(data=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        pixels = image if image.ndim == 3 else image[..., np.newaxis]
        if pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(f"an image array is uint8, height x width (x channels), not {image.dtype} {image.shape}")
        height, width, channels = pixels.shape
        return inference_pb2.Image(raw=inference_pb2.RawImage(
            width=width, height=height, channels=channels, pixels=pixels.tobytes(),
        ))  # fmt: skip
    from PIL import ImageOps  # only a caller who holds a Pillow image needs Pillow

    upright = ImageOps.exif_transpose(image)
    pixels = upright if upright.mode in _RAW_MODES else upright.convert("RGB")
    return image_message(np.asarray(pixels))


def audio_message(audio: AudioSource, sample_rate: int | None = None) -> inference_pb2.Audio:
    """An Audio message: files and bytes are sent encoded (the server decodes them); samples as
    raw float32 with their rate (`sample_rate` for a bare array)."""
    if isinstance(audio, bytes):
        return inference_pb2.Audio(data=audio)
    if isinstance(audio, str | os.PathLike):
        return inference_pb2.Audio(data=Path(audio).read_bytes())
    samples, rate = audio if isinstance(audio, tuple) else (audio, sample_rate)
    if rate is None:
        raise ValueError("an array of samples needs its sample rate: pass (samples, rate) or sample_rate=")
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise ValueError(f"audio samples are 1-D (mono) or frames x channels, not of shape {samples.shape}")
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    raw = inference_pb2.RawAudio(samples=samples.astype("<f4").tobytes(), sample_rate=rate, channels=channels)
    return inference_pb2.Audio(raw=raw)


def _audios(audios: Sequence[AudioSource], sample_rate: int | None) -> list[inference_pb2.Audio]:
    return [audio_message(audio, sample_rate) for audio in audios]


def _transcribe_options(
    return_timestamps: bool | str, language: str | None, task: str | None, chunk_length_s: float,
    stride_length_s: float, parameters: dict[str, Any],
) -> dict[str, Any]:
    """The fields TranscribeRequest and TranscribeStreamRequest share; generation parameters only
    where some are given (CTC models refuse them)."""
    if return_timestamps not in _TIMESTAMPS:
        raise ValueError(f"return_timestamps is False, True, 'word' or 'char', not {return_timestamps!r}")
    options = {
        "language": language or "", "task": task or "", "return_timestamps": _TIMESTAMPS[return_timestamps],
        "chunk_length_s": chunk_length_s, "stride_length_s": stride_length_s,
    }  # fmt: skip
    if any(value is not None for value in parameters.values()):
        options["parameters"] = _generation_parameters(parameters)
    return options


def _patch_mask(mask: Sequence[int] | ImageSource) -> inference_pb2.PatchMask:
    """Patch indices (a list, tuple or range of ints), else a mask image."""
    if isinstance(mask, list | tuple | range):
        return inference_pb2.PatchMask(patches=inference_pb2.PatchIndices(indices=mask))
    return inference_pb2.PatchMask(image=image_message(mask))


def _image_classification(message: inference_pb2.ImageClassification) -> Classification:
    return Classification([LabelScore(x.label, x.score) for x in message.labels])


def _generation_parameters(options: dict[str, Any]) -> inference_pb2.GenerationParameters:
    """Only the options given are set, so the server applies its defaults to the rest."""
    return inference_pb2.GenerationParameters(**{k: v for k, v in options.items() if v is not None})


class _Methods:
    """The typed methods; `_unary` and `_stream` are the client's transport."""

    def __init__(self, channel: Any, timeout: float | None, token: str | None) -> None:
        self.channel = channel
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.models = models_pb2_grpc.ModelsStub(channel)

    def _unary(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def _stream(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> Any:
        raise NotImplementedError

    def encode(
        self, model: str, texts: Sequence[str], pooling: str | None = None, normalize: bool = False,
        truncate: bool | None = None, version: int = 0,
    ) -> Response[list[float]]:
        request = inference_pb2.EncodeRequest(
            model=model, version=version, texts=texts, normalize=normalize, truncate=truncate,
            pooling=_enum(common_pb2.Pooling, pooling),
        )
        return self._unary(
            self.inference.Encode, request, lambda r: _response(r, [list(e.values) for e in r.embeddings])
        )

    def encode_image(
        self, model: str, images: Sequence[ImageSource], normalize: bool = False, pooling: str | None = None,
        version: int = 0,
    ) -> Response[list[float]]:
        """One embedding per image; `images` as for classify_image. CLIP models embed texts in the
        same space with encode."""
        request = inference_pb2.EncodeImageRequest(
            model=model, version=version, images=[image_message(image) for image in images], normalize=normalize,
            pooling=_enum(common_pb2.Pooling, pooling),
        )
        return self._unary(
            self.inference.EncodeImage, request, lambda r: _response(r, [list(e.values) for e in r.embeddings])
        )

    def reconstruct_image(
        self, model: str, images: Sequence[ImageSource], masks: Sequence[Sequence[int] | ImageSource] = (),
        seed: int = 0, mask_ratio: float = 0.0, version: int = 0,
    ) -> Response[Reconstruction]:
        """Masked image modeling: `masks` none (random, drawn with `seed` and `mask_ratio`), one for
        every image or one per image, each a list of patch indices or a mask image (bright patches
        are masked); `images` as for classify_image."""
        request = inference_pb2.ReconstructImageRequest(
            model=model, version=version, images=[image_message(image) for image in images],
            masks=[_patch_mask(mask) for mask in masks], seed=seed, mask_ratio=mask_ratio,
        )
        return self._unary(
            self.inference.ReconstructImage, request,
            lambda r: _response(r, [Reconstruction.from_proto(x) for x in r.results]),
        )

    def classify(
        self, model: str, texts: Sequence[str], text_pairs: Sequence[str] | None = None, top_k: int = 0,
        candidate_labels: Sequence[str] | None = None, hypothesis_template: str = "",
        multi_label: bool = False, truncate: bool | None = None, version: int = 0,
    ) -> Response[Classification]:
        request = inference_pb2.ClassifyRequest(
            model=model, version=version, texts=texts, text_pairs=text_pairs or [], top_k=top_k,
            candidate_labels=candidate_labels or [], hypothesis_template=hypothesis_template,
            multi_label=multi_label, truncate=truncate,
        )
        return self._unary(
            self.inference.Classify, request,
            lambda r: _response(r, [Classification.from_proto(c) for c in r.results]),
        )

    def classify_image(
        self, model: str, images: Sequence[ImageSource], top_k: int = 0,
        candidate_labels: Sequence[str] | None = None, hypothesis_template: str = "", version: int = 0,
    ) -> Response[Classification]:
        """`images`: paths, encoded bytes, Pillow images or uint8 arrays (see image_message);
        top_k 0 returns 5 labels, the pipeline's default."""
        request = inference_pb2.ClassifyImageRequest(
            model=model, version=version, images=[image_message(image) for image in images], top_k=top_k,
            candidate_labels=candidate_labels or [], hypothesis_template=hypothesis_template,
        )
        return self._unary(
            self.inference.ClassifyImage, request,
            lambda r: _response(r, [_image_classification(c) for c in r.results]),
        )

    def detect_objects(
        self, model: str, images: Sequence[ImageSource], threshold: float | None = None, version: int = 0
    ) -> Response[list[DetectedObject]]:
        """Per image, the objects scoring above `threshold` (None: 0.5, the pipeline's default),
        boxes in the original image's pixels; `images` as for classify_image."""
        request = inference_pb2.DetectObjectsRequest(
            model=model, version=version, images=[image_message(image) for image in images], threshold=threshold,
        )
        return self._unary(
            self.inference.DetectObjects, request,
            lambda r: _response(r, [[DetectedObject.from_proto(x) for x in d.objects] for d in r.results]),
        )

    def segment_image(
        self, model: str, images: Sequence[ImageSource], subtask: str | None = None, threshold: float | None = None,
        mask_threshold: float | None = None, overlap_mask_area_threshold: float | None = None, version: int = 0,
    ) -> Response[list[Segment]]:
        """Per image, its segments with masks of its size; `subtask` "semantic", "instance",
        "panoptic" or None (the model's, as the pipeline picks); the thresholds None for the
        pipeline's defaults; `images` as for classify_image."""
        request = inference_pb2.SegmentImageRequest(
            model=model, version=version, images=[image_message(image) for image in images],
            subtask=_enum(inference_pb2.SegmentationSubtask, subtask), threshold=threshold,
            mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap_mask_area_threshold,
        )
        return self._unary(
            self.inference.SegmentImage, request,
            lambda r: _response(r, [[Segment.from_proto(x) for x in s.segments] for s in r.results]),
        )

    def caption_image(
        self, model: str, images: Sequence[ImageSource], version: int = 0, **parameters: Any
    ) -> Response[GeneratedSequence]:
        """One caption per image (its generated_text, token ids and finish reason). `images` as for
        classify_image; `parameters` are GenerationParameters' fields, as for generate."""
        request = inference_pb2.CaptionImageRequest(
            model=model, version=version, images=[image_message(image) for image in images],
            parameters=_generation_parameters(parameters),
        )
        return self._unary(
            self.inference.CaptionImage, request,
            lambda r: _response(r, [GeneratedSequence.from_proto(s) for s in r.results]),
        )

    def transcribe(
        self, model: str, audios: Sequence[AudioSource], sample_rate: int | None = None,
        return_timestamps: bool | str = False, language: str | None = None, task: str | None = None,
        chunk_length_s: float = 0.0, stride_length_s: float = 0.0, version: int = 0, **parameters: Any,
    ) -> Response[Transcription]:
        """Speech recognition, one Transcription per audio, as the automatic-speech-recognition
        pipeline: `return_timestamps` True (segments), "word" (CTC, and Whisper models with alignment
        heads) or "char" (CTC models); `language` and `task` ("transcribe", "translate") and
        generation `parameters` for Whisper; long audio cut into chunks of `chunk_length_s` with
        `stride_length_s` on each side (0: the defaults)."""
        options = _transcribe_options(return_timestamps, language, task, chunk_length_s, stride_length_s, parameters)
        request = inference_pb2.TranscribeRequest(
            model=model, version=version, audios=_audios(audios, sample_rate), **options
        )
        return self._unary(
            self.inference.Transcribe, request,
            lambda r: _response(r, [Transcription.from_proto(t) for t in r.results]),
        )

    def transcribe_stream(
        self, model: str, audio: AudioSource, sample_rate: int | None = None,
        return_timestamps: bool | str = False, language: str | None = None, task: str | None = None,
        chunk_length_s: float = 0.0, stride_length_s: float = 0.0, version: int = 0, **parameters: Any,
    ) -> Any:
        """An iterator (async iterator for AsyncClient) of TranscriptionPiece, one per segment or
        chunk as it becomes final; the last carries the whole Transcription. Options as transcribe's."""
        options = _transcribe_options(return_timestamps, language, task, chunk_length_s, stride_length_s, parameters)
        request = inference_pb2.TranscribeStreamRequest(
            model=model, version=version, audio=audio_message(audio, sample_rate), **options
        )
        return self._stream(self.inference.TranscribeStream, request, TranscriptionPiece.from_proto)

    def classify_audio(
        self, model: str, audios: Sequence[AudioSource], sample_rate: int | None = None, top_k: int = 0,
        version: int = 0,
    ) -> Response[Classification]:
        """Audio classification, as the audio-classification pipeline: labels by descending score,
        at most `top_k` (0: the pipeline's 5)."""
        request = inference_pb2.ClassifyAudioRequest(
            model=model, version=version, audios=_audios(audios, sample_rate), top_k=top_k
        )
        return self._unary(
            self.inference.ClassifyAudio, request,
            lambda r: _response(r, [_image_classification(c) for c in r.results]),
        )

    def tag_tokens(
        self, model: str, texts: Sequence[str], aggregation: str = "simple",
        ignore_labels: Sequence[str] | None = None, version: int = 0,
    ) -> Response[list[Entity]]:
        request = inference_pb2.TagTokensRequest(
            model=model, version=version, texts=texts, ignore_labels=ignore_labels or [],
            aggregation_strategy=_enum(inference_pb2.AggregationStrategy, aggregation),
        )
        return self._unary(
            self.inference.TagTokens, request,
            lambda r: _response(r, [[Entity.from_proto(e) for e in t.entities] for t in r.results]),
        )

    def answer(
        self, model: str, questions: Sequence[str], contexts: Sequence[str], top_k: int = 1,
        doc_stride: int = 0, max_answer_len: int = 0, max_seq_len: int = 0, max_question_len: int = 0,
        handle_impossible_answer: bool = False, version: int = 0,
    ) -> Response[list[Answer]]:
        request = inference_pb2.AnswerRequest(
            model=model, version=version, questions=questions, contexts=contexts, top_k=top_k,
            doc_stride=doc_stride, max_answer_len=max_answer_len, max_seq_len=max_seq_len,
            max_question_len=max_question_len, handle_impossible_answer=handle_impossible_answer,
        )
        return self._unary(
            self.inference.Answer, request,
            lambda r: _response(r, [[Answer.from_proto(a) for a in x.answers] for x in r.results]),
        )

    def fill_mask(
        self, model: str, texts: Sequence[str], top_k: int = 5, targets: Sequence[str] | None = None,
        version: int = 0,
    ) -> Response[list[list[MaskCandidate]]]:
        request = inference_pb2.FillMaskRequest(
            model=model, version=version, texts=texts, top_k=top_k, targets=targets or []
        )
        return self._unary(
            self.inference.FillMask, request,
            lambda r: _response(
                r, [[[MaskCandidate.from_proto(c) for c in m.candidates] for m in x.masks] for x in r.results]
            ),
        )

    def generate(
        self, model: str, prompts: Sequence[str], version: int = 0, **parameters: Any
    ) -> Response[GeneratedSequence]:
        """`parameters` are GenerationParameters' fields: max_new_tokens, do_sample, temperature,
        top_k, top_p, seed, repetition_penalty, stop, return_full_text, num_beams, length_penalty,
        early_stopping, no_repeat_ngram_size."""
        request = inference_pb2.GenerateRequest(
            model=model, version=version, prompts=prompts, parameters=_generation_parameters(parameters)
        )
        return self._unary(
            self.inference.Generate, request,
            lambda r: _response(r, [GeneratedSequence.from_proto(s) for s in r.results]),
        )

    def generate_stream(self, model: str, prompt: str, version: int = 0, **parameters: Any) -> Any:
        """An iterator (async iterator for AsyncClient) of StreamChunk, each with its `text` piece."""
        request = inference_pb2.GenerateStreamRequest(
            model=model, version=version, prompt=prompt, parameters=_generation_parameters(parameters)
        )
        return self._stream(self.inference.GenerateStream, request, StreamChunk.from_proto)

    def tokenize(
        self, model: str, texts: Sequence[str], text_pairs: Sequence[str] | None = None,
        add_special_tokens: bool | None = None, truncation: bool | None = None, max_length: int = 0,
        padding: str | None = None, version: int = 0,
    ) -> Response[Encoding]:
        request = inference_pb2.TokenizeRequest(
            model=model, version=version, texts=texts, text_pairs=text_pairs or [],
            add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length,
            padding=_enum(inference_pb2.Padding, padding),
        )
        return self._unary(
            self.inference.Tokenize, request, lambda r: _response(r, [Encoding.from_proto(e) for e in r.encodings])
        )

    def detokenize(
        self, model: str, sequences: Sequence[Sequence[int]], skip_special_tokens: bool | None = None,
        version: int = 0,
    ) -> Response[str]:
        request = inference_pb2.DetokenizeRequest(
            model=model, version=version, skip_special_tokens=skip_special_tokens,
            sequences=[inference_pb2.TokenIds(ids=s) for s in sequences],
        )
        return self._unary(self.inference.Detokenize, request, lambda r: _response(r, list(r.texts)))

    def list_models(self) -> list[ModelInfo]:
        return self._unary(
            self.models.ListModels, models_pb2.ListModelsRequest(),
            lambda r: [ModelInfo.from_proto(m) for m in r.models],
        )

    def get_model(self, model: str, version: int = 0) -> ModelInfo:
        return self._unary(
            self.models.GetModel, models_pb2.GetModelRequest(model=model, version=version), ModelInfo.from_proto
        )


class Client(_Methods):
    """Blocking client. `Client("host:port")`, or pass a ready `grpc.Channel`. `credentials`
    (`grpc.ssl_channel_credentials(...)`) makes the channel TLS; `token` is sent as a bearer token.
    A channel made here receives answers of any size the server sends (CHANNEL_OPTIONS)."""

    def __init__(
        self, target: str | grpc.Channel = DEFAULT_TARGET, timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
    ) -> None:
        if isinstance(target, str):
            target = (
                grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
                if credentials
                else grpc.insecure_channel(target, CHANNEL_OPTIONS)
            )
        super().__init__(target, timeout, token)

    def _unary(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> Any:
        return parse(method(request, timeout=self.timeout, metadata=self.metadata))

    def _stream(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> Iterator[Any]:
        call = method(request, timeout=self.timeout, metadata=self.metadata)
        try:
            for message in call:
                yield parse(message)
        finally:
            call.cancel()  # leaving the loop early cancels the call, so the server stops generating

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncClient(_Methods):
    """asyncio client: every method is awaited; generate_stream is an async iterator. `credentials`
    and `token` as for Client."""

    def __init__(
        self, target: str | grpc.aio.Channel = DEFAULT_TARGET, timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
    ) -> None:
        if isinstance(target, str):
            target = (
                grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
                if credentials
                else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
            )
        super().__init__(target, timeout, token)

    async def _unary(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> Any:
        return parse(await method(request, timeout=self.timeout, metadata=self.metadata))

    async def _stream(self, method: Callable, request: Message, parse: Callable[[Any], Any]) -> AsyncIterator[Any]:
        call = method(request, timeout=self.timeout, metadata=self.metadata)
        try:
            async for message in call:
                yield parse(message)
        finally:
            call.cancel()  # leaving the loop early cancels the call, so the server stops generating

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
