"""The oracle of the generation tests: transformers' generate() on the same checkpoint, with the
prompts padded as the server pads them (left for decoders, right for encoders)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

# Prompts of mixed lengths and scripts; batched, they are padded.
PROMPTS = [
    "The cat visited",
    "我喜欢",
    "A young engineer painted the old bridge in Paris on Monday, then a cup of coffee",
    "Rockets 🚀 and",
]


@cache
def tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase:
    loaded = AutoTokenizer.from_pretrained(checkpoint)
    if loaded.pad_token is None:  # GPT-2: generate() pads with EOS, as the server does
        loaded.pad_token = loaded.eos_token
    return loaded


@cache
def model(checkpoint: Path, seq2seq: bool) -> torch.nn.Module:
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_pretrained(checkpoint).eval()


def eos_ids(checkpoint: Path, seq2seq: bool) -> list[int]:
    eos = model(checkpoint, seq2seq).generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def generate_ids(checkpoint: Path, prompts: list[str], seq2seq: bool = False, **settings: object) -> list[list[int]]:
    """The new token ids of each prompt, each cut after its first EOS (generate() pads the
    shorter sequences of a batch after it; the server returns each sequence's own tokens)."""
    batch = tokenizer(checkpoint)(
        prompts, padding=True, padding_side="right" if seq2seq else "left", return_tensors="pt"
    )
    generator = model(checkpoint, seq2seq)
    with torch.no_grad():
        output = generator.generate(**batch, pad_token_id=tokenizer(checkpoint).pad_token_id, **settings)
    start = 1 if seq2seq else batch["input_ids"].shape[1]  # the decoder start token, or the prompt
    ends = set(eos_ids(checkpoint, seq2seq))
    results = []
    for row in output[:, start:].tolist():
        cut = next((index + 1 for index, token in enumerate(row) if token in ends), len(row))
        results.append(row[:cut])
    return results


def decode(checkpoint: Path, token_ids: list[int]) -> str:
    return tokenizer(checkpoint).decode(token_ids, skip_special_tokens=True)
