"""Whisper's word timestamps, as transformers computes them for the automatic-speech-recognition
pipeline's return_timestamps="word", in numpy.

Each decoded window's tokens are read once more by the alignment graph (export/alignment.py),
which returns the cross-attention weights of the model's alignment heads; those are cut to the
window's audio frames, normalized per frame over the tokens, median-filtered along time and
averaged over the heads, and dynamic time warping finds the monotonic path of tokens through
time: a token's time is where the path first reaches it (`_extract_token_timestamps`). As there,
the rows of the prompt tokens are left out, and the last generated token, which the decoder never
read, takes the time of the one before it. The tokens are then grouped into words and
punctuation merged into its neighbours (`_combine_tokens_into_words`); a word spans from the time
of the token before its first to the time of its last (`_decode_asr`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.runtime.sessions import Session

#: The alignment graph's role in a Whisper version, and its file.
ALIGNMENT_ROLE = "alignment"
ALIGNMENT_FILE = "alignment.onnx"
#: The graph's metadata: the median filter's width (the config's median_filter_width), which the
#: server reads, and the heads it was built from, for whoever inspects the file.
MEDIAN_FILTER_KEY = "median_filter_width"
ALIGNMENT_HEADS_KEY = "alignment_heads"
#: Languages written without spaces between words: split where the decoded text is whole
#: characters (Whisper's language codes of transformers' list).
_UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
_PREPENDED = "\"'“¡¿([{-"
_APPENDED = "\"'.。,，!！?？:：”)]}、"
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_REPLACEMENT = "\ufffd"

#: A text token's start and end in seconds.
Span = tuple[float, float]


@dataclass(frozen=True)
class Word:
    """One of the pipeline's word chunks: its text, with where it starts and ends in seconds."""

    text: str
    start: float
    end: float


class Alignment:
    """The alignment graph's session and how its weights are smoothed."""

    def __init__(self, session: Session, time_precision: float) -> None:
        metadata = session.session.get_modelmeta().custom_metadata_map
        try:
            self.median_filter_width = int(metadata[MEDIAN_FILTER_KEY])
        except (KeyError, ValueError) as error:
            raise ModelLoadError(
                f"the alignment graph's metadata has no valid {MEDIAN_FILTER_KEY} ({error!r}): re-export the model"
            ) from error
        if self.median_filter_width <= 0 or self.median_filter_width % 2 != 1:
            raise ModelLoadError(f"the alignment graph's median filter width {self.median_filter_width} is not odd")
        self.session = session
        self.time_precision = time_precision

    def token_times(
        self, hidden: np.ndarray, prompt: Sequence[int], generated: Sequence[int], frames: int
    ) -> np.ndarray:
        """The time in seconds of each generated token (the end token it stopped at included) of a
        window, from its encoder states [positions, d_model], its decoder prompt and the number of
        feature frames that hold audio (the rest is padding)."""
        rows = len(generated) - 1  # the last generated token was never read: it has no attention row
        times = np.zeros(len(generated))
        # No encoder frame holding audio (under 20 ms of it): every token at 0, where transformers'
        # warping path over no frames would put them at -0.02 s.
        if rows <= 0 or frames // 2 == 0:
            return times
        ids = np.array([[*prompt, *generated[:-1]]], dtype=np.int64)
        weights = self.session.run({"input_ids": ids, "encoder_hidden_states": hidden[np.newaxis]})
        matrix = weights["cross_attentions"][0, :, len(prompt) :, : frames // 2]
        jump_times = _jump_times(self._smoothed(matrix)) * self.time_precision
        times[:rows] = jump_times
        times[rows:] = jump_times[-1]
        return times.astype(np.float32).astype(np.float64)  # transformers' token_timestamps are float32

    def _smoothed(self, weights: np.ndarray) -> np.ndarray:
        """[heads, tokens, frames] -> [tokens, frames]: each frame standardized over the tokens,
        median-filtered along time, averaged over the heads."""
        with np.errstate(divide="ignore", invalid="ignore"):  # one token: 0 / 0, NaN as in transformers
            weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
        return median_filter(weights, self.median_filter_width).mean(axis=0)


def median_filter(values: np.ndarray, width: int) -> np.ndarray:
    """transformers' `_median_filter`: the median of `width` neighbours along the last axis, the
    edges reflected; unchanged when the axis is no longer than half the width."""
    half = width // 2
    if values.shape[-1] <= half:
        return values
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(half, half)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., half]


def _jump_times(matrix: np.ndarray) -> np.ndarray:
    """For each token (row), the first time index (column) the warping path reaches it."""
    text_indices, time_indices = dynamic_time_warping(-matrix.astype(np.float64))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    return time_indices[jumps].astype(np.float64)


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `_dynamic_time_warping` (a float32 cost, ties going right then up), its
    cells computed one anti-diagonal at a time: a cell needs only the two diagonals before it."""
    tokens, frames = matrix.shape
    cost = np.full((tokens + 1, frames + 1), np.inf, dtype=np.float32)
    trace = np.full((tokens + 1, frames + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    for diagonal in range(2, tokens + frames + 1):
        i = np.arange(max(1, diagonal - frames), min(tokens, diagonal - 1) + 1)
        j = diagonal - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        diagonal_best = (c0 < c1) & (c0 < c2)
        up_best = ~diagonal_best & (c1 < c0) & (c1 < c2)
        step = np.where(diagonal_best, 0, np.where(up_best, 1, 2))
        cost[i, j] = matrix[i - 1, j - 1] + np.choose(step, [c0, c1, c2])
        trace[i, j] = step
    return _backtrace(trace)


def _backtrace(trace: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = trace.shape[0] - 1, trace.shape[1] - 1
    trace[0, :], trace[:, 0] = 2, 1
    text_indices, time_indices = [], []
    while i > 0 or j > 0:
        text_indices.append(i - 1)
        time_indices.append(j - 1)
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return np.array(text_indices[::-1]), np.array(time_indices[::-1])


def token_span(times: np.ndarray, index: int, offset: float) -> Span:
    """The span of the window's token at `index` as `_decode_asr` gives it: from the time of the
    token before it (0 for the first) to its own, shifted by the window's offset in the audio and
    rounded to 10 ms."""
    return round((times[index - 1] if index else 0.0) + offset, 2), round(times[index] + offset, 2)


def words(
    tokens: Sequence[int], spans: Sequence[Span], decode: Callable[[list[int]], str], language: str
) -> list[Word]:
    """A segment's text tokens as words (`_collate_word_timestamps`): split on spaces (or on
    whole characters for languages written without them), punctuation merged into the word it
    belongs to; each word from its first token's start to its last token's end."""
    if language in _UNSPACED_LANGUAGES:
        pieces = _split_on_characters(tokens, decode)
    else:
        pieces = _split_on_spaces(tokens, decode)
    _merge_punctuation(pieces)
    return [Word(text, spans[indices[0]][0], spans[indices[-1]][1]) for text, indices in pieces if text]


def _split_on_characters(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[str, list[int]]]:
    """Runs of tokens that decode to whole characters (a replacement character that is in the
    whole text too ends a run)."""
    whole = decode(list(tokens))
    pieces: list[tuple[str, list[int]]] = []
    run: list[int] = []
    offset = 0
    for index in range(len(tokens)):
        run.append(index)
        text = decode([tokens[i] for i in run])
        if _REPLACEMENT not in text or whole[offset + text.index(_REPLACEMENT)] == _REPLACEMENT:
            pieces.append((text, run))
            run, offset = [], offset + len(text)
    return pieces


def _split_on_spaces(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[str, list[int]]]:
    """Whole-character runs joined into words: a run that starts with a space, or is punctuation,
    starts a word. (transformers also starts one at a special token; the tokens here are text.)"""
    pieces: list[tuple[str, list[int]]] = []
    for text, indices in _split_on_characters(tokens, decode):
        if not pieces or text.startswith(" ") or text.strip() in _PUNCTUATION:
            pieces.append((text, indices))
        else:
            previous, previous_indices = pieces[-1]
            pieces[-1] = (previous + text, previous_indices + indices)
    return pieces


def _merge_punctuation(pieces: list[tuple[str, list[int]]]) -> None:
    """transformers' `_merge_punctuations`, in place: opening punctuation (after a space) joins the
    word after it, closing punctuation the word before it; emptied pieces are left as ''."""
    following = len(pieces) - 1
    for index in range(len(pieces) - 2, -1, -1):
        text, indices = pieces[index]
        if text.startswith(" ") and text.strip() in _PREPENDED:
            pieces[following] = (text + pieces[following][0], indices + pieces[following][1])
            pieces[index] = ("", [])
        else:
            following = index
    before = 0
    for index in range(1, len(pieces)):
        text, indices = pieces[index]
        if not pieces[before][0].endswith(" ") and text in _APPENDED:
            pieces[before] = (pieces[before][0] + text, pieces[before][1] + indices)
            pieces[index] = ("", [])
        else:
            before = index
