"""The oracle side of the parity tests: what transformers and PyTorch answer on a checkpoint."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

# Inputs that stress tokenization and offsets: accents, CJK, emoji, runs of spaces, lengths.
TRICKY_TEXTS = [
    "I love this so much!",
    "Café au lait in Zürich, naïve but fine.",
    "São Paulo   has    several spaces.",
    "你好，世界。今天天气很好。",
    "Rockets 🚀 and smiles 🙂 everywhere",
    "a",
    "The quick brown fox jumps over the lazy dog " * 6,
]


@cache
def tokenizer(checkpoint: Path):
    return AutoTokenizer.from_pretrained(checkpoint)


@cache
def base_model(checkpoint: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(checkpoint).eval()


def pooled_embeddings(checkpoint: Path, texts: list[str], pooling: str, normalize: bool) -> np.ndarray:
    """Pooling done in PyTorch over AutoModel's last_hidden_state."""
    batch = tokenizer(checkpoint)(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base_model(checkpoint)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "last_token":
        last = batch["attention_mask"].sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
    else:
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_same_ranking(served, expected, tolerance: float) -> None:
    """A served classification (labels by score) against a pipeline's list of {label, score}."""
    assert [x.label for x in served.labels] == [x["label"] for x in expected]
    for got, want in zip(served.labels, expected, strict=True):
        assert got.score == pytest.approx(want["score"], abs=tolerance)
