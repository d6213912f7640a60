"""Classify at parity with transformers.pipeline("text-classification") on the same checkpoint."""

from __future__ import annotations

from functools import cache

import pytest
from transformers import pipeline

from tests.checkpoints import CORPUS
from tests.parity import TRICKY_TEXTS, assert_same_ranking

KINDS = [
    "bert-sequence-classification",
    "distilbert-sequence-classification",
    "roberta-sequence-classification",
    "bert-sequence-classification-multilabel",
]
TEXTS = TRICKY_TEXTS + CORPUS[10:30]
# The MRPC example of the seed: is the second sentence a paraphrase of the first?
PAIRS = [
    ("The company HuggingFace is based in New York City",
     "HuggingFace's headquarters are situated in Manhattan"),
    ("The company HuggingFace is based in New York City", "Apples are especially bad for your health"),
    ("你好，世界。", "Café au lait 🙂"),
]


@cache
def reference(checkpoint):
    return pipeline("text-classification", model=str(checkpoint), top_k=None, device="cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_classify_matches_pipeline_fp32(fp32_server, exported, kind):
    with fp32_server.client() as client:
        response = client.classify(model=kind, texts=TEXTS)
    expected = reference(exported[kind].checkpoint)(TEXTS)
    assert len(response) == len(TEXTS)
    for served, want in zip(response, expected, strict=True):
        assert_same_ranking(served, want, 1e-4)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_classify_pairs_match_pipeline(fp32_server, exported, kind):
    with fp32_server.client() as client:
        response = client.classify(model=kind, texts=[a for a, _ in PAIRS], text_pairs=[b for _, b in PAIRS])
    classifier = reference(exported[kind].checkpoint)
    for served, (text, pair) in zip(response, PAIRS, strict=True):
        assert_same_ranking(served, classifier({"text": text, "text_pair": pair}), 1e-4)


def test_multilabel_scores_are_sigmoids(fp32_server):
    kind = "bert-sequence-classification-multilabel"
    with fp32_server.client() as client:
        response = client.classify(model=kind, texts=TEXTS[:5])
    for result in response:
        assert len(result.labels) == 4
        assert sum(x.score for x in result.labels) != pytest.approx(1.0, abs=1e-3)


def test_top_k_limits_labels(fp32_server, exported):
    kind = "distilbert-sequence-classification"
    with fp32_server.client() as client:
        top1 = client.classify(model=kind, texts=TEXTS, top_k=1)
        every = client.classify(model=kind, texts=TEXTS)
    for short, full in zip(top1, every, strict=True):
        assert len(short.labels) == 1 and len(full.labels) == 3
        assert short.label == full.label and short.score == pytest.approx(full.score)


@pytest.mark.parametrize("kind", KINDS)
def test_classify_int8_agrees_on_top1(int8_server, exported, kind):
    with int8_server.client() as client:
        response = client.classify(model=kind, texts=TEXTS)
    assert response.metadata.precision == "int8"
    expected = reference(exported[kind].checkpoint)(TEXTS)
    agreement = sum(s.label == e[0]["label"] for s, e in zip(response, expected, strict=True)) / len(TEXTS)
    assert agreement >= 0.9
