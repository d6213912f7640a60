"""Multiple-choice Classify at parity with AutoModelForMultipleChoice's softmax over the choices."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForMultipleChoice

from tests.checkpoints import CORPUS
from tests.encoder_parity import assert_ranking, one_torch_thread, tie_aware_agreement  # noqa: F401 (a fixture)
from tests.parity import TRICKY_TEXTS, tokenizer
from tests.test_errors import expect_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KIND = "bert-multiple-choice"
KINDS = [KIND]
PROMPTS = TRICKY_TEXTS + CORPUS[::30]
CHOICES = [
    "a cup of coffee",
    "the museum",
    "Zürich 🙂",
    "北京的博物馆",
    "nothing at all, really nothing at all, not even a naïve robot in São Paulo",
]


@cache
def model(checkpoint) -> torch.nn.Module:
    return AutoModelForMultipleChoice.from_pretrained(checkpoint).eval()


def expected_ranking(checkpoint, prompt: str, choices: list[str]) -> list[tuple[str, float]]:
    """The choices by descending softmax of the PyTorch model, all choices in one padded input."""
    batch = tokenizer(checkpoint)([prompt] * len(choices), choices, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(checkpoint)(**{name: value[None] for name, value in batch.items()}).logits[0]
    probabilities = logits.softmax(-1).numpy()
    return [(choices[i], float(probabilities[i])) for i in np.argsort(-probabilities, kind="stable")]


def ranking(classification) -> list[tuple[str, float]]:
    return [(x.label, x.score) for x in classification.labels]


@pytest.mark.parametrize("choices", [CHOICES, CHOICES[:2], CHOICES[3:]], ids=["five", "two", "long-and-cjk"])
def test_choices_match_pytorch_fp32(client, exported, choices):
    response = client.classify(model=KIND, texts=PROMPTS, candidate_labels=choices)
    assert len(response) == len(PROMPTS)
    for served, prompt in zip(response, PROMPTS, strict=True):
        assert served.sequence == prompt
        assert_ranking(ranking(served), expected_ranking(exported[KIND].checkpoint, prompt, choices))
        assert sum(x.score for x in served.labels) == pytest.approx(1.0, abs=1e-5)


def test_top_k_limits_choices(client):
    every = client.classify(model=KIND, texts=PROMPTS[:4], candidate_labels=CHOICES)
    top2 = client.classify(model=KIND, texts=PROMPTS[:4], candidate_labels=CHOICES, top_k=2)
    for full, short in zip(every, top2, strict=True):
        assert ranking(short) == ranking(full)[:2]


def test_requests_batched_together_keep_their_own_scores(fp32_server):
    """Concurrent requests may share ONNX runs; each one's rows must come back to it unchanged."""
    calls = [(PROMPTS[i : i + 2], CHOICES[: 2 + i % 4]) for i in range(12)]

    def classify(call):
        with fp32_server.client() as client:
            return client.classify(model=KIND, texts=call[0], candidate_labels=call[1])

    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(classify, calls))
    for call, response in zip(calls, together, strict=True):
        alone = classify(call)
        for merged, single in zip(response, alone, strict=True):
            assert_ranking(ranking(merged), ranking(single))
    assert max(r.metadata.batch_size for r in together) > max(len(t) * len(c) for t, c in calls)


def test_int8_agrees_on_top1(int8_server, exported):
    prompts = PROMPTS + CORPUS[301:340:3]
    with int8_server.client() as client:
        response = client.classify(model=KIND, texts=prompts, candidate_labels=CHOICES)
    assert response.metadata.precision == "int8"
    expected = [expected_ranking(exported[KIND].checkpoint, prompt, CHOICES) for prompt in prompts]
    # The random head barely tells choices apart (fp32 margins from 5.4e-7), but int8 moves scores
    # by at most 4.6e-7 (measured): the best choice agrees for 35 of 35 prompts.
    for served, wanted in zip(response, expected, strict=True):
        scores = dict(ranking(served))
        for choice, score in wanted:
            assert abs(scores[choice] - score) <= 1e-4
    assert tie_aware_agreement([r.label for r in response], expected) >= 0.9


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, ["candidate_labels", "choices"]),
        ({"candidate_labels": CHOICES, "multi_label": True}, ["multi_label", "zero-shot"]),
        ({"candidate_labels": CHOICES, "hypothesis_template": "It is {}."}, ["hypothesis_template", "zero-shot"]),
        ({"candidate_labels": CHOICES, "text_pairs": ["x"]}, ["text_pairs", "candidate_labels"]),
    ],
    ids=["no-choices", "multi-label", "template", "text-pairs"],
)
def test_bad_input_is_invalid(client, options, words):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, *words):
        client.classify(model=KIND, texts=["x"], **options)
