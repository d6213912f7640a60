"""Encoder-decoder models (optimum's text2text-generation-with-past and image-to-text-with-past
graphs): the encoder runs once over its inputs (the right-padded prompts, or the images'
pixel_values), then the decoder runs once per token from the decoder start token, with its cache
(self-attention keys growing, cross-attention keys fixed) fed back.

The decoder is optimum's merged graph (role "decoder"): `use_cache_branch` False for the first
run, True after. An export with a separate with-past graph (role "decoder_with_past") also works."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.tasks.generation.cache import Cache, new_cache
from onnxserve.server.tasks.generation.causal import Timed


def text_encoder_inputs(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, np.ndarray]:
    """A text encoder's feeds: the prompts padded on the right, and their attention mask."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Seq2SeqModel:
    """One batch of encoder inputs (one row per sequence) on an encoder-decoder: the StepModel of
    the decoding loops."""

    def __init__(
        self,
        sessions: dict[str, Session],
        encoder_inputs: Mapping[str, np.ndarray],
        decoder_start_token_id: int,
        timed: Timed,
        decoder_prompt: np.ndarray | None = None,
    ) -> None:
        """`decoder_prompt`: each row's first decoder tokens [rows, length] where a task puts more
        than the start token there (Whisper: start, language, task and timestamps tokens)."""
        self.encoder = sessions["encoder"]
        self.first_decoder = sessions["decoder"]
        self.decoder = sessions.get("decoder_with_past", self.first_decoder)
        self.encoder_inputs = encoder_inputs
        rows = len(next(iter(encoder_inputs.values())))
        start = np.full((rows, 1), decoder_start_token_id, dtype=np.int64)
        self.history = start if decoder_prompt is None else decoder_prompt.astype(np.int64)
        self.timed = timed
        self.cache: Cache = new_cache(self.first_decoder, rows)

    def _encode(self) -> np.ndarray:
        return self.encoder.run(self.encoder_inputs)["last_hidden_state"]

    def start(self) -> np.ndarray:
        hidden = self.timed(self._encode)
        # Per-row inputs of every decoder run: the cache holds them, so that they follow the rows
        # when rows are reordered or dropped, and stay on the device under I/O binding. Images
        # are not padded: their decoders take no encoder mask.
        held = {"encoder_hidden_states": hidden}
        if "attention_mask" in self.encoder_inputs:
            held["encoder_attention_mask"] = self.encoder_inputs["attention_mask"]
        self.cache.hold(held)
        inputs = {"input_ids": self.history, "use_cache_branch": np.array([False])}
        return self.timed(lambda: self.cache.run(self.first_decoder, inputs))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": tokens[:, None].astype(np.int64), "use_cache_branch": np.array([True])}
        return self.timed(lambda: self.cache.run(self.decoder, inputs))

    def keep(self, rows: np.ndarray) -> None:
        self.cache.take(rows)

    def release(self) -> None:
        self.cache.clear()


class EncodedSeq2SeqModel(Seq2SeqModel):
    """A Seq2SeqModel whose encoder already ran (speech: in the encoder batch that concurrent
    requests share): its states, each row's decoder prompt, and the attention mask its decoder
    takes, if any (Speech2Text's decoder takes the features' mask and subsamples it itself)."""

    def __init__(
        self,
        sessions: dict[str, Session],
        hidden: np.ndarray,
        decoder_prompt: np.ndarray,
        timed: Timed,
        attention_mask: np.ndarray | None = None,
    ) -> None:
        inputs = {"encoder_hidden_states": hidden}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        super().__init__(sessions, inputs, int(decoder_prompt[0, 0]), timed, decoder_prompt=decoder_prompt)

    def _encode(self) -> np.ndarray:
        return self.encoder_inputs["encoder_hidden_states"]
