"""Transcribe and TranscribeStream for Speech2Text (Speech2TextForConditionalGeneration, an
AutoModelForSpeechSeq2Seq), as the automatic-speech-recognition pipeline runs a seq2seq model that
is not Whisper: the whole audio's Kaldi filter banks (audio.kaldi_fbank, the checkpoint's
Speech2TextFeatureExtractor) through the encoder once, the decoder from the decoder start token
with the generation machinery (greedy, beams, sampling, the KV cache, one step per yield so that
a cancelled call stops within a step), and the ids decoded into text with the special tokens
skipped. The task's registration (speech_recognition.py) builds this pipeline for checkpoints of
model type speech_to_text.

A multilingual (speech translation) checkpoint's target language is the token its decoder is
forced to start with, `<lang:xx>` (Speech2TextTokenizer's lang_code_to_id, which a pipeline user
passes as forced_bos_token_id): the request's `language` names it, else the checkpoint's
generation config's forced BOS token applies. What the pipeline does not do for these models is
refused, naming why: timestamps (it raises for seq2seq models other than Whisper), a task
(Whisper's), and chunk_length_s (the pipeline drops the chunks' stride for these models and joins
their texts with the overlaps repeated). Audio is transcribed whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.batching import BatchRunner, RowOutputs
from onnxserve.server.runtime.stats import DecodingStats, Timings
from onnxserve.server.tasks.audio import decode, kaldi_fbank, read_feature_extractor, run_per_length
from onnxserve.server.tasks.base import ModelResources, Pipeline, require_batch
from onnxserve.server.tasks.generation.decoding import decode as decode_steps
from onnxserve.server.tasks.generation.drivers import Generation, SoloGeneration, run
from onnxserve.server.tasks.generation.preparation import RequestSetup
from onnxserve.server.tasks.generation.seq2seq import EncodedSeq2SeqModel

from onnxserve.v1 import inference_pb2

MODEL_TYPE = "speech_to_text"
#: The token of a target language, as Speech2TextTokenizer spells it.
LANGUAGE_TOKEN = "<lang:{}>"
Request = inference_pb2.TranscribeRequest | inference_pb2.TranscribeStreamRequest


@dataclass(frozen=True)
class Features:
    """One audio's filter banks [frames, bins], a row of the encoder's batch: len() is its frames
    (10 ms each), what the batcher's token budget counts."""

    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


def refuse_unsupported(request: Request) -> None:
    """INVALID_ARGUMENT for the options the pipeline does not take for Speech2Text."""
    if request.return_timestamps != inference_pb2.TIMESTAMPS_UNSPECIFIED:
        raise InvalidArgument(
            "Speech2Text models give no timestamps: the pipeline returns them for Whisper (segments, words) "
            "and CTC models (characters, words) only"
        )
    if request.task:
        raise InvalidArgument(
            "Speech2Text models take no task (Whisper's prompt token): a speech translation checkpoint translates, "
            "into the language given"
        )
    if request.chunk_length_s or request.stride_length_s:
        raise InvalidArgument(
            "Speech2Text models transcribe the whole audio at once: chunk_length_s and stride_length_s are not "
            "taken (the pipeline joins such chunks' texts with their overlaps repeated)"
        )


def encoder_batch(features: Sequence[Features], hidden: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Audios of different lengths as one decoder batch: their encoder states padded to the
    longest, and their features' attention mask, which the decoder graph takes over the feature
    frames and subsamples to the states' positions itself."""
    states = np.zeros((len(hidden), max(len(h) for h in hidden), hidden[0].shape[-1]), dtype=hidden[0].dtype)
    mask = np.zeros((len(features), max(len(f) for f in features)), dtype=np.int64)
    for row, (audio, states_of_audio) in enumerate(zip(features, hidden, strict=True)):
        states[row, : len(states_of_audio)] = states_of_audio
        mask[row, : len(audio)] = 1
    return states, mask


class Speech2TextPipeline(Pipeline[Any]):
    """Speech2Text: each audio's features through the encoder's batcher, then decoding on the
    generation executor."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        if resources.directory is None or self.tokenizer is None:
            raise ModelLoadError(f"model {self.name!r}: Speech2Text needs its folder's feature extractor and tokenizer")
        self.require_graphs("a Speech2Text model", "encoder", "decoder")
        self.features = read_feature_extractor(resources.directory)
        self.setup = RequestSetup(self.manifest, self.tokenizer.tokenizer, seq2seq=True)
        self.start_token = self.manifest.generation.decoder_start_token_id
        self.settings = resources.settings
        self.stats = DecodingStats()
        self.runner: BatchRunner | None = None

    def open(self) -> None:
        self.runner = BatchRunner(self.name, self._encode, self.settings)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()

    def _encode(self, audios: Sequence[Features]) -> list[RowOutputs]:
        """One encoder run per length among the audios: padding would change a batchmate's last
        states (the convolutions read the padding as signal), so nothing is padded."""
        encoder = self.sessions["encoder"]
        return run_per_length(
            [audio.values for audio in audios],
            lambda batch: encoder.run({"input_features": batch, "attention_mask": np.ones(batch.shape[:2], np.int64)}),
        )

    async def warm_up(self) -> None:
        silence = np.zeros(self.features.sampling_rate, dtype=np.float32)
        await self._encoder().infer([Features(kaldi_fbank(silence, self.features))], Timings())

    def _encoder(self) -> BatchRunner:
        if self.runner is None:
            raise RuntimeError(f"the pipeline of model {self.name!r} was not opened")
        return self.runner

    # --- the request --------------------------------------------------------------------------

    async def _encoded(
        self, audios: Sequence[inference_pb2.Audio], timings: Timings
    ) -> tuple[list[Features], list[np.ndarray]]:
        """Each audio's features, and its encoder states (through the shared batcher)."""
        rate, max_seconds = self.features.sampling_rate, self.settings.max_audio_seconds
        features = await self._blocking(
            lambda: timings.timed(
                "tokenization",
                lambda: [
                    Features(kaldi_fbank(decode(audio, index, rate, max_seconds), self.features))
                    for index, audio in enumerate(audios)
                ],
            )
        )
        rows = await self._encoder().infer(features, timings)
        return features, [row["last_hidden_state"] for row in rows]

    def language_token(self, language: str) -> int | None:
        """The token the decoder is forced to start with for `language` (a code, "fr"); None
        without one (the checkpoint's forced BOS token, if any, applies)."""
        if not language:
            return None
        token_id = self.tokenizer.tokenizer.token_to_id(LANGUAGE_TOKEN.format(language.strip()))
        if token_id is None:
            raise InvalidArgument(
                f"model {self.name!r} has no language token {LANGUAGE_TOKEN.format(language.strip())}: a multilingual "
                "Speech2Text model takes its target languages' codes; others take no language"
            )
        return token_id

    def start(
        self,
        features: Sequence[Features],
        hidden: Sequence[np.ndarray],
        parameters: inference_pb2.GenerationParameters,
        language: int | None,
        timings: Timings,
    ) -> Generation:
        """The decoding of every audio, from the decoder start token, `language` forced after it
        if given (on the generation executor)."""
        states, mask = encoder_batch(features, hidden)
        setup = self.setup.from_encoder_inputs(
            {"encoder_hidden_states": states}, parameters, timings, forced_bos_token_id=language
        )
        prompts = np.full((len(states), 1), self.start_token, dtype=np.int64)
        model = EncodedSeq2SeqModel(self.sessions, states, prompts, lambda work: timings.timed("inference", work), mask)
        steps = decode_steps(model, setup.outputs, setup.decoding)
        return SoloGeneration(setup, timings, steps, model.release, self.stats)

    def transcription(self, tokens: Sequence[int]) -> inference_pb2.Transcription:
        """The pipeline's text: the ids decoded with the special tokens skipped."""
        return inference_pb2.Transcription(text=self.tokenizer.decode(tokens), token_ids=tokens)

    async def _decode(self, request: Request, audios: Sequence[inference_pb2.Audio], timings: Timings) -> Generation:
        refuse_unsupported(request)
        language = self.language_token(request.language)
        features, hidden = await self._encoded(audios, timings)
        return await asyncio.get_running_loop().run_in_executor(
            self.executors.generation, self.start, features, hidden, request.parameters, language, timings
        )

    # --- the RPCs -----------------------------------------------------------------------------

    async def run(
        self, rpc: str, request: inference_pb2.TranscribeRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.TranscribeResponse:
        require_batch(request.audios, "audios")
        generation = await self._decode(request, request.audios, timings)
        decoded = await run(generation, self.executors.generation)
        timings.tokens = sum(len(result.token_ids) for result in decoded.results)
        return inference_pb2.TranscribeResponse(
            results=[self.transcription(result.token_ids) for result in decoded.results]
        )

    async def stream(
        self, rpc: str, request: inference_pb2.TranscribeStreamRequest, timings: Timings, time_left: float | None
    ) -> AsyncIterator[tuple[Any, bool]]:
        """The text as one piece (a Speech2Text transcription has no segments), then the
        transcription. A cancelled call closes the decoding within a step, as GenerateStream."""
        if not request.HasField("audio"):
            raise InvalidArgument("the request holds no audio: set audio")
        generation = await self._decode(request, [request.audio], timings)
        async with aclosing(generation.steps(self.executors.generation, streaming=False)) as steps:
            async for _ in steps:
                pass
        (output,) = generation.outputs
        timings.tokens = len(output.tokens)
        result = self.transcription(output.tokens)
        yield inference_pb2.TranscribeStreamResponse(chunk=inference_pb2.TranscriptionChunk(text=result.text)), False
        yield inference_pb2.TranscribeStreamResponse(transcription=result), True
