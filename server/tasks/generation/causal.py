"""Decoder-only models: optimum's text-generation-with-past graph (one prefill over the
left-padded prompts, then one run per token with the cache fed back), or the fused graph
(fused.py), picked by `open_causal_model` from the graph's inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.tasks.generation.cache import Cache, Timed, new_cache
from onnxserve.server.tasks.generation.decoding import StepModel
from onnxserve.server.tasks.generation.fused import FusedGraph, FusedModel, is_fused


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts padded on the left, so that every row's next token goes in the same column."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, -len(prompt) :] = prompt
            mask[row, -len(prompt) :] = 1
    return ids, mask


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """Each real token's position counted from the row's first real token; padding gets 1, as
    transformers gives it (it is masked out anyway)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions)


class CausalModel:
    """One batch of prompts on a decoder-only graph: the StepModel of the decoding loops."""

    def __init__(self, session: Session, prompts: Sequence[Sequence[int]], pad_token_id: int, timed: Timed) -> None:
        self.session = session
        self.history, self.mask = left_pad(prompts, pad_token_id)
        self.timed = timed
        self.cache: Cache = new_cache(session, len(prompts))

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": input_ids, "attention_mask": self.mask, "position_ids": position_ids}
        return self.timed(lambda: self.cache.run(self.session, inputs))

    def start(self) -> np.ndarray:
        return self._run(self.history, prompt_positions(self.mask))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
        positions = self.mask.sum(axis=1, keepdims=True) - 1
        return self._run(tokens[:, None].astype(np.int64), positions)

    def keep(self, rows: np.ndarray) -> None:
        self.mask = self.mask[rows]
        self.cache.take(rows)

    def release(self) -> None:
        self.cache.clear()


def open_causal_model(
    session: Session,
    prompts: Sequence[Sequence[int]],
    pad_token_id: int,
    timed: Timed,
    rows: int,
    max_new_tokens: int,
) -> StepModel:
    """The step model for a decoder-only graph, whichever layout it was exported with: the fused
    graph (docs/decoder-graph.md) or optimum's. `rows` is the most rows it will hold (prompts x
    beams)."""
    if not is_fused(session):
        return CausalModel(session, prompts, pad_token_id, timed)
    history, _ = left_pad(prompts, pad_token_id)
    length = max(len(prompt) for prompt in prompts) + max_new_tokens
    return FusedModel(FusedGraph(session), prompts, history, timed, rows, length)
