"""Logits processors: small steps that reshape the next-token scores before a token is chosen.

Each takes the token history of every row (the padded prompt plus what was generated, as
transformers' `input_ids`) and the scores [rows, vocab], and returns new scores. They follow the
semantics of transformers' processors of the same name, so greedy and beam search match its
`generate()` token for token, and they chain in its order (`LogitsChain`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

NEG_INF = np.float32(-np.inf)


class LogitsProcessor(Protocol):
    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class LogitsChain:
    """Processors applied in order."""

    processors: tuple[LogitsProcessor, ...] = ()

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self.processors:
            scores = processor(history, scores)
        return scores

    def __add__(self, other: LogitsChain) -> LogitsChain:
        return LogitsChain(self.processors + other.processors)


@dataclass(frozen=True)
class RepetitionPenalty:
    """Makes every token already in the row less likely: positive scores divided, negative ones
    multiplied by the penalty (once per token, however often it occurred)."""

    penalty: float

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        seen = np.take_along_axis(scores, history, axis=1)
        penalized = np.where(seen < 0, seen * self.penalty, seen / self.penalty).astype(scores.dtype)
        scores = scores.copy()
        np.put_along_axis(scores, history, penalized, axis=1)
        return scores


@dataclass(frozen=True)
class NoRepeatNGram:
    """Bans each token that would complete an n-gram the row already holds."""

    size: int

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        length = history.shape[1]
        if length + 1 < self.size:
            return scores
        scores = scores.copy()
        for row, tokens in enumerate(history.tolist()):
            scores[row, self._banned(tokens)] = NEG_INF
        return scores

    def _banned(self, tokens: list[int]) -> list[int]:
        prefix = tuple(tokens[len(tokens) + 1 - self.size :])
        width = self.size - 1
        return [
            tokens[start + width]
            for start in range(len(tokens) - width)
            if tuple(tokens[start : start + width]) == prefix
        ]


@dataclass(frozen=True)
class ForceToken:
    """Forces `token_ids` when the history is `at_length` long: the forced BOS right after the
    decoder start (at_length 1), or the forced EOS as the last token allowed (max_length - 1)."""

    token_ids: tuple[int, ...]
    at_length: int

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if history.shape[1] != self.at_length:
            return scores
        forced = np.full_like(scores, NEG_INF)
        forced[:, list(self.token_ids)] = 0
        return forced


@dataclass(frozen=True)
class SuppressTokens:
    """Tokens that may never be generated (a checkpoint's single-token bad_words_ids, e.g. Marian's
    padding, which is also its decoder start)."""

    token_ids: tuple[int, ...]

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        scores[:, list(self.token_ids)] = NEG_INF
        return scores


@dataclass(frozen=True)
class SuppressTokensAtBegin:
    """Tokens that may not come first: banned only at the step whose history is `begin_index`
    long (Whisper's begin_suppress_tokens, a blank and the end of text, right after its prompt)."""

    token_ids: tuple[int, ...]
    begin_index: int

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if history.shape[1] != self.begin_index:
            return scores
        return SuppressTokens(self.token_ids)(history, scores)


@dataclass(frozen=True)
class WhisperTimestamps:
    """transformers' WhisperTimeStampLogitsProcessor: timestamp tokens (ids from
    `timestamp_begin` on) come in pairs around text, never decrease, the first one is at most
    `max_initial_index` steps in, and a timestamp is forced where the timestamps together are more
    likely than any text token. <|notimestamps|> is never generated."""

    timestamp_begin: int
    no_timestamps_token_id: int
    eos_token_id: int
    begin_index: int
    max_initial_index: int | None

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = scores.copy()
        scores[:, self.no_timestamps_token_id] = NEG_INF
        for row, tokens in enumerate(history[:, self.begin_index :].tolist()):
            self._pairs(tokens, scores[row])
        if history.shape[1] == self.begin_index:
            scores[:, : self.timestamp_begin] = NEG_INF
            if self.max_initial_index is not None:
                scores[:, self.timestamp_begin + self.max_initial_index + 1 :] = NEG_INF
        logprobs = log_softmax(scores.astype(np.float32))
        timestamp_logprob = _logsumexp(logprobs[:, self.timestamp_begin :])
        text_logprob = logprobs[:, : self.timestamp_begin].max(axis=-1)
        scores[timestamp_logprob > text_logprob, : self.timestamp_begin] = NEG_INF
        return scores

    def _pairs(self, tokens: list[int], row: np.ndarray) -> None:
        last_was_timestamp = len(tokens) >= 1 and tokens[-1] >= self.timestamp_begin
        penultimate_was_timestamp = len(tokens) < 2 or tokens[-2] >= self.timestamp_begin
        if last_was_timestamp:
            if penultimate_was_timestamp:  # a closed pair: text must follow
                row[self.timestamp_begin :] = NEG_INF
            else:  # an opened segment's end: no text
                row[: self.eos_token_id] = NEG_INF
        timestamps = [token for token in tokens if token >= self.timestamp_begin]
        if timestamps:
            # The segment's end may repeat its start; anything else moves forward.
            last = timestamps[-1] if last_was_timestamp and not penultimate_was_timestamp else timestamps[-1] + 1
            row[self.timestamp_begin : last] = NEG_INF


@dataclass(frozen=True)
class Temperature:
    temperature: float

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores / np.float32(self.temperature)


@dataclass(frozen=True)
class TopK:
    """Keeps the k best tokens (ties with the k-th kept too), at least `min_keep`."""

    k: int
    min_keep: int = 1

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        k = min(max(self.k, self.min_keep), scores.shape[-1])
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
        return np.where(scores < kth, NEG_INF, scores)


@dataclass(frozen=True)
class TopP:
    """Nucleus filtering: drops the least likely tokens whose probabilities sum to at most 1 - p,
    always keeping the `min_keep` best."""

    p: float
    min_keep: int = 1

    def __call__(self, history: np.ndarray, scores: np.ndarray) -> np.ndarray:
        order = np.argsort(scores, axis=-1, kind="stable")
        ascending = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(softmax(ascending), axis=-1)
        drop_sorted = cumulative <= (1 - self.p)
        drop_sorted[:, -self.min_keep :] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        return np.where(drop, NEG_INF, scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """log(sum(exp(values))) per row, without underflow; -inf for a row of -inf."""
    peak = values.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(peak), peak, 0)
    with np.errstate(divide="ignore"):
        return (safe + np.log(np.exp(values - safe).sum(axis=-1, keepdims=True)))[:, 0]


def processors(
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    suppress_token_ids: Sequence[int],
    forced_bos_token_id: int | None,
    forced_eos_token_ids: Sequence[int],
    max_length: int,
) -> LogitsChain:
    """The processors that shape scores whatever the decoding, in transformers' order.
    `max_length` is the history length (padded prompt or decoder start, plus new tokens) at which
    decoding ends."""
    chain: list[LogitsProcessor] = []
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGram(no_repeat_ngram_size))
    if suppress_token_ids:
        chain.append(SuppressTokens(tuple(suppress_token_ids)))
    if forced_bos_token_id is not None:
        chain.append(ForceToken((forced_bos_token_id,), 1))
    if forced_eos_token_ids:
        chain.append(ForceToken(tuple(forced_eos_token_ids), max_length - 1))
    return LogitsChain(tuple(chain))


def warpers(temperature: float, top_k: int, top_p: float, min_keep: int = 1) -> LogitsChain:
    """The sampling warpers, applied after `processors` when sampling."""
    chain: list[LogitsProcessor] = []
    if temperature != 1.0:
        chain.append(Temperature(temperature))
    if top_k > 0:
        chain.append(TopK(top_k, min_keep))
    if top_p < 1.0:
        chain.append(TopP(top_p, min_keep))
    return LogitsChain(tuple(chain))
