"""Request setup, apart from the drivers: a Generate or GenerateStream request's prompts and
parameters made into what a driver decodes. The prompts are tokenized and checked against the
model's context, the parameters checked and completed with the checkpoint's defaults
(settings.py), and each prompt gets its output (stopping criteria, incremental detokenizer) and
the request its `Decoding` (logits processors, warpers, sampler). Encoder-decoders whose encoder
takes no text (images) are set up from the encoder inputs their task made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.tasks.base import require_batch
from onnxserve.server.tasks.generation import logits
from onnxserve.server.tasks.generation.decoding import Decoding, Sampler
from onnxserve.server.tasks.generation.seq2seq import text_encoder_inputs
from onnxserve.server.tasks.generation.settings import MAX_SEQUENCES, GenerationSettings, resolve_settings
from onnxserve.server.tasks.generation.stopping import OutputSequence, StoppingCriteria
from onnxserve.server.tasks.generation.streaming import IncrementalDecoder
from tokenizers import Tokenizer

from onnxserve.v1 import inference_pb2, manifest_pb2


@dataclass
class GenerationRequest:
    """A request set up for decoding: one token-id list and one output per prompt, and the
    encoder's inputs of an encoder-decoder (one row per prompt; empty for causal models)."""

    prompts: Sequence[str]
    token_ids: list[list[int]]
    encoder_inputs: Mapping[str, np.ndarray]
    settings: GenerationSettings
    outputs: list[OutputSequence]
    decoding: Decoding


class RequestSetup:
    """Sets up the requests of one model: causal (`seq2seq` False) or encoder-decoder."""

    def __init__(self, manifest: manifest_pb2.Manifest, tokenizer: Tokenizer, seq2seq: bool) -> None:
        self.manifest = manifest
        self.defaults = manifest.generation
        self.tokenizer = tokenizer
        self.seq2seq = seq2seq
        self.eos_token_ids = tuple(self.defaults.eos_token_ids)
        self.pad_token_id = self.defaults.pad_token_id if self.defaults.HasField("pad_token_id") else 0

    @property
    def context(self) -> int:
        """The longest decoder sequence: prompt plus new tokens (causal), start plus new (seq2seq)."""
        return self.defaults.max_length or self.manifest.max_length

    def __call__(
        self, prompts: Sequence[str], parameters: inference_pb2.GenerationParameters, timings: Timings
    ) -> GenerationRequest:
        require_batch(prompts, "prompts")
        token_ids = timings.timed("tokenization", lambda: self._tokenize(prompts))
        timings.tokens = sum(len(ids) for ids in token_ids)
        encoder_inputs = text_encoder_inputs(token_ids, self.pad_token_id) if self.seq2seq else {}
        return self._request(prompts, token_ids, encoder_inputs, parameters, timings)

    def from_encoder_inputs(
        self,
        encoder_inputs: Mapping[str, np.ndarray],
        parameters: inference_pb2.GenerationParameters,
        timings: Timings,
        start_length: int = 1,
        forced_bos_token_id: int | None = None,
    ) -> GenerationRequest:
        """An encoder-decoder's request whose encoder inputs the task made (an image's
        pixel_values, speech features): one sequence per row, from the decoder start token alone,
        or from `start_length` tokens the task puts first (Whisper's language and task tokens).
        `forced_bos_token_id` replaces the checkpoint's (Speech2Text's target language)."""
        rows = len(next(iter(encoder_inputs.values())))
        prompts, token_ids = [""] * rows, [[] for _ in range(rows)]
        return self._request(prompts, token_ids, encoder_inputs, parameters, timings, start_length, forced_bos_token_id)

    def _request(
        self,
        prompts: Sequence[str],
        token_ids: list[list[int]],
        encoder_inputs: Mapping[str, np.ndarray],
        parameters: inference_pb2.GenerationParameters,
        timings: Timings,
        start_length: int = 1,
        forced_bos_token_id: int | None = None,
    ) -> GenerationRequest:
        settings = resolve_settings(parameters, self.defaults, self._room(token_ids, start_length))
        timings.batch_size = len(prompts) * settings.num_beams
        if timings.batch_size > MAX_SEQUENCES:
            raise InvalidArgument(
                f"{len(prompts)} prompts x {settings.num_beams} beams make {timings.batch_size} sequences, "
                f"over the server's limit of {MAX_SEQUENCES} per request"
            )
        outputs = [self._output(settings) for _ in prompts]
        history_length = start_length if self.seq2seq else max(len(ids) for ids in token_ids)
        decoding = self._decoding(settings, history_length, forced_bos_token_id)
        return GenerationRequest(prompts, token_ids, encoder_inputs, settings, outputs, decoding)

    def _tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        token_ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(prompts))]
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

    def _room(self, token_ids: list[list[int]], start_length: int) -> int:
        if self.seq2seq:
            return self.context - start_length  # the decoder's start tokens take positions too
        return self.context - max(len(ids) for ids in token_ids)

    def _output(self, settings: GenerationSettings) -> OutputSequence:
        criteria = StoppingCriteria(settings.max_new_tokens, frozenset(self.eos_token_ids), settings.stop)
        return OutputSequence(criteria, IncrementalDecoder(self.tokenizer))

    def _decoding(self, settings: GenerationSettings, history_length: int, forced_bos: int | None = None) -> Decoding:
        d = self.defaults
        forced_eos = (d.forced_eos_token_id,) if d.HasField("forced_eos_token_id") else ()
        if forced_bos is None and d.HasField("forced_bos_token_id"):
            forced_bos = d.forced_bos_token_id
        processors = logits.processors(
            repetition_penalty=settings.repetition_penalty,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            suppress_token_ids=list(d.suppress_token_ids),
            forced_bos_token_id=forced_bos,
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
