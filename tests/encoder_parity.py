"""Comparisons shared by the parity tests of the encoder heads (Answer, FillMask, TagTokens,
zero-shot and multiple-choice Classify)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

# Random tiny models give small probabilities (a span's is a product of two over hundreds of
# tokens), so scores must also agree relative to their size, not only within 1e-4.
SCORE_ABS = 1e-4
SCORE_REL = 1e-3
TIE = 1e-6


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread while a module runs its reference models: tiny models gain nothing
    from more, and on a busy machine the threads wait on each other (measured 25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_score(served: float, expected: float) -> None:
    assert abs(served - expected) <= SCORE_ABS
    assert served == pytest.approx(expected, rel=SCORE_REL, abs=1e-9)


def assert_ranking(served: Sequence[tuple[str, float]], expected: Sequence[tuple[str, float]]) -> None:
    """The same labels with the pipeline's scores, in the pipeline's order, except that labels
    whose scores differ by a float32 rounding or two may swap: nearly flat random heads give such
    near-ties, which ONNX Runtime and PyTorch round apart."""
    scores = dict(expected)
    assert len(served) == len(expected)
    for (label, score), (_, expected_score) in zip(served, expected, strict=True):
        assert_score(score, scores[label])
        assert abs(scores[label] - expected_score) <= TIE


def agreement(served: Sequence[object], expected: Sequence[object]) -> float:
    """The share of positions where the two sequences hold equal items."""
    assert len(served) == len(expected) > 0
    return sum(s == e for s, e in zip(served, expected, strict=True)) / len(expected)


def tie_aware_agreement(served: Sequence[str], expected: Sequence[Sequence[tuple[str, float]]]) -> float:
    """The share of inputs whose served best label is the reference's best, or scores within TIE
    of it there (exact and near ties of nearly flat random heads count as agreeing)."""
    assert len(served) == len(expected) > 0
    hits = [dict(ranking)[label] >= ranking[0][1] - TIE for label, ranking in zip(served, expected, strict=True)]
    return sum(hits) / len(hits)
