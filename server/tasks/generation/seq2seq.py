"""Encoder-decoder models (optimum's text2text-generation-with-past graphs): the encoder runs
once over the right-padded prompts, then the decoder runs once per token from the decoder start
token, with its cache (self-attention keys growing, cross-attention keys fixed) fed back.

The decoder is optimum's merged graph (role "decoder"): `use_cache_branch` False for the first
run, True after. An export with a separate with-past graph (role "decoder_with_past") also works."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.tasks.generation.cache import Cache, new_cache
from onnxserve.server.tasks.generation.causal import Timed


def right_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return ids, mask


class Seq2SeqModel:
    """One batch of prompts on an encoder-decoder: the StepModel of the decoding loops."""

    def __init__(
        self,
        sessions: dict[str, Session],
        prompts: Sequence[Sequence[int]],
        pad_token_id: int,
        decoder_start_token_id: int,
        timed: Timed,
    ) -> None:
        self.encoder = sessions["encoder"]
        self.first_decoder = sessions["decoder"]
        self.decoder = sessions.get("decoder_with_past", self.first_decoder)
        self.input_ids, self.encoder_mask = right_pad(prompts, pad_token_id)
        self.history = np.full((len(prompts), 1), decoder_start_token_id, dtype=np.int64)
        self.timed = timed
        self.cache: Cache = new_cache(self.first_decoder, len(prompts))

    def _encode(self) -> np.ndarray:
        feeds = {"input_ids": self.input_ids, "attention_mask": self.encoder_mask}
        return self.encoder.run(feeds)["last_hidden_state"]

    def start(self) -> np.ndarray:
        hidden = self.timed(self._encode)
        # Per-row inputs of every decoder run: the cache holds them, so that they follow the rows
        # when rows are reordered or dropped, and stay on the device under I/O binding.
        self.cache.hold({"encoder_hidden_states": hidden, "encoder_attention_mask": self.encoder_mask})
        inputs = {"input_ids": self.history, "use_cache_branch": np.array([False])}
        return self.timed(lambda: self.cache.run(self.first_decoder, inputs))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": tokens[:, None].astype(np.int64), "use_cache_branch": np.array([True])}
        return self.timed(lambda: self.cache.run(self.decoder, inputs))

    def keep(self, rows: np.ndarray) -> None:
        self.cache.take(rows)

    def release(self) -> None:
        self.cache.clear()
