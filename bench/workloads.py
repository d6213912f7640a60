"""The texts each benchmark request carries: short (about 16 tokens), medium (about 128) and mixed
lengths. Texts are words drawn from the model's own vocabulary with a fixed seed, as many as make
their length in tokens (special tokens included), so every engine sees the same inputs."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

TEXTS_PER_WORKLOAD = 256


@dataclass(frozen=True)
class Workload:
    name: str
    texts: list[str]
    tokens: list[int]  # each text's length in tokens

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / len(self.tokens)


def _mixed(rng: random.Random) -> int:
    """Mostly short texts with a tail of long ones, as search queries beside documents."""
    bucket = rng.random()
    if bucket < 0.6:
        return rng.randint(8, 32)
    return rng.randint(32, 128) if bucket < 0.9 else rng.randint(128, 256)


LENGTHS: dict[str, Callable[[random.Random], int]] = {"short": lambda _: 16, "medium": lambda _: 128, "mixed": _mixed}


def _words(tokenizer: Tokenizer) -> list[str]:
    """Whole lowercase words of the vocabulary, one token each (no subword pieces or special
    tokens), sorted so that the draw does not depend on the vocabulary's hash order."""
    return sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and w.islower() and len(w) > 2)


def build(name: str, tokenizer: Tokenizer, count: int = TEXTS_PER_WORKLOAD, seed: int = 0) -> Workload:
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy, counting without padding or truncation
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rng = random.Random(f"{name}-{seed}")
    words = _words(tokenizer)
    special = len(tokenizer.encode("").ids)
    texts = [" ".join(rng.choices(words, k=max(1, LENGTHS[name](rng) - special))) for _ in range(count)]
    return Workload(name, texts, [len(e.ids) for e in tokenizer.encode_batch(texts)])
