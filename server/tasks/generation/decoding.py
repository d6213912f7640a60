"""The decoding loops over a step model: greedy or sampling, and beam search.

Both are generators that yield once per model step, so that the caller runs each step where it
likes (off the event loop) and can stop between two steps; closing the generator ends decoding.
They follow transformers' `generate()`: the same processors on the same history, and beam search
with the bookkeeping of its `_beam_search` (top 2k candidates, length penalty, early stopping),
so that token ids agree with it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from onnxserve.server.tasks.generation.logits import LogitsChain, log_softmax
from onnxserve.server.tasks.generation.stopping import OutputSequence

# transformers' stand-in for minus infinity in beam scores; in float32, adding it to a
# log-probability swamps the log-probability.
_NEG = np.float32(-1.0e9)


class StepModel(Protocol):
    """A generative graph with its cache, for one batch of prompts. `history` is where each row's
    token history starts: the left-padded prompts, or the decoder start token."""

    history: np.ndarray

    def start(self) -> np.ndarray:
        """Runs the prompts (prefill, or the encoder plus the first decoder step); returns the
        next-token logits [rows, vocab]."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds one new token per row; returns the next-token logits."""

    def keep(self, rows: np.ndarray) -> None:
        """Keeps the given rows of the cache, in that order."""

    def release(self) -> None:
        """Frees the cache."""


class Sampler:
    """Draws tokens from softmax(scores) with a seeded generator: the same seed and scores give the
    same tokens. Adding Gumbel noise to the scores and taking the largest is an exact draw (the
    k largest: k draws without replacement), and a token at -inf is never drawn."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def _perturbed(self, scores: np.ndarray) -> np.ndarray:
        return scores + self.rng.gumbel(size=scores.shape)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """One token per row."""
        return self._perturbed(scores).argmax(axis=-1)

    def choice(self, scores: np.ndarray, count: int) -> np.ndarray:
        """`count` distinct indices per row."""
        return top_k(self._perturbed(scores), count)[1]


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen. `processors` shape the scores (log-probabilities in beam search);
    `warpers` follow them when sampling, which `sampler` does (None: greedy)."""

    processors: LogitsChain
    warpers: LogitsChain
    sampler: Sampler | None
    num_beams: int
    length_penalty: float
    early_stopping: bool
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int


def decode(model: StepModel, outputs: Sequence[OutputSequence], how: Decoding) -> Iterator[None]:
    """Decodes the model's rows into `outputs` (one per row), one yield per model step."""
    if how.num_beams > 1:
        return BeamSearch(how, len(outputs), model.history).run(model, outputs)
    return _greedy_or_sample(model, model.history, outputs, how)


def _greedy_or_sample(
    model: StepModel, history: np.ndarray, outputs: Sequence[OutputSequence], how: Decoding
) -> Iterator[None]:
    rows = np.arange(len(outputs))
    chain = how.processors + how.warpers if how.sampler else how.processors
    # The history grows into a buffer sized for the whole generation: a step writes one column
    # instead of copying everything before it.
    length = history.shape[1]
    history = np.concatenate([history, np.zeros((len(rows), how.max_new_tokens), dtype=history.dtype)], axis=1)
    logits = model.start()
    while True:
        scores = chain(history[:, :length], logits)
        tokens = how.sampler(scores) if how.sampler else scores.argmax(axis=-1)
        history[:, length] = tokens
        length += 1
        for row, token in zip(rows, tokens.tolist(), strict=True):
            outputs[row].append(token)
        yield
        live = np.array([not outputs[row].finished for row in rows])
        if not live.any():
            return
        if not live.all():
            # A finished sequence leaves the batch: later steps neither run nor count it.
            model.keep(np.flatnonzero(live))
            rows, history, tokens = rows[live], history[live], tokens[live]
        logits = model.step(tokens)


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row and their indices, largest first (equal values among
    them: lower index first)."""
    candidates = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    picked = np.take_along_axis(values, candidates, axis=-1)
    order = np.lexsort((candidates, -picked), axis=-1)
    indices = np.take_along_axis(candidates, order, axis=-1)
    return np.take_along_axis(values, indices, axis=-1), indices


def _gather(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """values[b, indices[b, j], ...]: selects beams per batch item (transformers' _gather_beams)."""
    return np.take_along_axis(values, indices.reshape(indices.shape + (1,) * (values.ndim - 2)), axis=1)


class BeamSearch:
    """transformers' vectorised beam search on [batch, beams, ...] arrays. Beams of a batch item
    advance together; `sequences` holds the best finished hypotheses, `running` the live ones."""

    def __init__(self, how: Decoding, batch: int, history: np.ndarray) -> None:
        self.how = how
        self.batch, self.beams = batch, how.num_beams
        self.prompt_length = history.shape[1]
        self.max_length = self.prompt_length + how.max_new_tokens
        # Keep enough candidates that num_beams of them are live even if the best ones all end.
        self.candidates = max(2, 1 + len(how.eos_token_ids)) * self.beams
        self.top_beam_mask = np.arange(self.candidates) < self.beams
        self.running = np.zeros((batch, self.beams, self.max_length), dtype=np.int64)
        self.running[:, :, : self.prompt_length] = history[:, None, :]
        self.sequences = self.running.copy()
        self.running_scores = np.zeros((batch, self.beams), dtype=np.float32)
        self.running_scores[:, 1:] = _NEG  # only the first beam expands at the first step
        self.scores = np.full((batch, self.beams), _NEG, dtype=np.float32)
        self.finished = np.zeros((batch, self.beams), dtype=bool)
        self.improvable = np.ones((batch, 1), dtype=bool)
        self.running_origins = np.full((batch, self.beams, how.max_new_tokens), -1, dtype=np.int64)
        self.origins = self.running_origins.copy()
        self.length = self.prompt_length

    def run(self, model: StepModel, outputs: Sequence[OutputSequence]) -> Iterator[None]:
        logits = model.start()
        expand = np.repeat(np.arange(self.batch), self.beams)
        model.keep(expand)
        logits = logits[expand]
        # Only the end decides the sequences: they are emitted with the last step's yield.
        while self._go_on(self._advance(logits)):
            yield
            model.keep(self.running_origins[:, :, self.length - 1 - self.prompt_length].reshape(-1))
            logits = model.step(self.running[:, :, self.length - 1].reshape(-1))
        self._emit(outputs)
        yield

    def _advance(self, logits: np.ndarray) -> bool:
        """One step of transformers' loop body; returns whether every candidate hit a stop."""
        flat_history = self.running[:, :, : self.length].reshape(self.batch * self.beams, self.length)
        log_probs = self.how.processors(flat_history, log_softmax(logits.astype(np.float32)))
        if self.how.sampler:
            log_probs = self.how.warpers(flat_history, log_probs)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.reshape(self.batch, self.beams, vocab) + self.running_scores[:, :, None]).reshape(
            self.batch, self.beams * vocab
        )
        top_scores, top_sequences, top_origins = self._continuations(accumulated, vocab)
        hits = np.isin(top_sequences[:, :, self.length], self.how.eos_token_ids) | (
            self.length + 1 >= self.max_length
        )
        self._next_running(top_scores, top_sequences, top_origins, hits)
        self._update_finished(top_scores, top_sequences, top_origins, hits)
        self.length += 1
        self._update_improvable()
        return bool(hits.all())

    def _continuations(self, accumulated: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.how.sampler:
            indices = self.how.sampler.choice(accumulated, self.candidates)
            scores = np.take_along_axis(accumulated, indices, axis=-1)
        else:
            scores, indices = top_k(accumulated, self.candidates)
        beam = indices // vocab
        origins = _gather(self.running_origins, beam)
        sequences = _gather(self.running, beam)
        sequences[:, :, self.length] = indices % vocab
        origins[:, :, self.length - self.prompt_length] = beam + np.arange(self.batch)[:, None] * self.beams
        return scores, sequences, origins

    def _next_running(self, scores: np.ndarray, sequences: np.ndarray, origins: np.ndarray, hits: np.ndarray) -> None:
        """The best num_beams candidates that did not just end go on."""
        live_scores = scores + hits.astype(np.float32) * _NEG
        _, best = top_k(live_scores, self.beams)
        self.running = _gather(sequences, best)
        self.running_scores = _gather(live_scores, best)
        self.running_origins = _gather(origins, best)

    def _update_finished(
        self, scores: np.ndarray, sequences: np.ndarray, origins: np.ndarray, hits: np.ndarray
    ) -> None:
        """Candidates among the top num_beams that just ended join the finished hypotheses if
        their length-normalised score beats the worst kept one."""
        just_finished = hits & self.top_beam_mask[None, :]
        scores = scores / np.float32((self.length + 1 - self.prompt_length) ** self.how.length_penalty)
        full = self.finished.all(axis=-1, keepdims=True) & self.how.early_stopping
        scores = scores + full.astype(np.float32) * _NEG
        scores = scores + (~self.improvable).astype(np.float32) * _NEG
        scores = scores + (~just_finished).astype(np.float32) * _NEG
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        _, best = top_k(merged_scores, self.beams)
        self.sequences = _gather(np.concatenate([self.sequences, sequences], axis=1), best)
        self.scores = _gather(merged_scores, best)
        self.origins = _gather(np.concatenate([self.origins, origins], axis=1), best)
        self.finished = _gather(np.concatenate([self.finished, just_finished], axis=1), best)

    def _update_improvable(self) -> None:
        """Whether a running beam could still beat the worst finished hypothesis, assuming (as
        transformers does without early_stopping="never") it ends at the current length."""
        best_running = self.running_scores[:, :1] / np.float32(
            (self.length - self.prompt_length) ** self.how.length_penalty
        )
        worst_finished = np.where(self.finished, self.scores.min(axis=1, keepdims=True), _NEG)
        self.improvable &= (best_running > worst_finished).any(axis=-1, keepdims=True)

    def _go_on(self, hits_all: bool) -> bool:
        all_full = bool(self.finished.all()) and self.how.early_stopping
        return bool(self.improvable.any()) and not all_full and not hits_all

    def _emit(self, outputs: Sequence[OutputSequence]) -> None:
        for item, output in enumerate(outputs):
            generated = int((self.origins[item, 0] >= 0).sum())
            start = self.prompt_length
            for token in self.sequences[item, 0, start : start + generated].tolist():
                if output.finished:
                    break
                output.append(token)
