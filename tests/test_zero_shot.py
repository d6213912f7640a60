"""Zero-shot Classify at parity with transformers.pipeline("zero-shot-classification")."""

from __future__ import annotations

from functools import cache

import grpc
import pytest
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.text_classification import nli_label_ids
from transformers import pipeline

from tests.checkpoints import CORPUS
from tests.encoder_parity import assert_ranking, one_torch_thread, tie_aware_agreement  # noqa: F401 (a fixture)
from tests.parity import TRICKY_TEXTS
from tests.test_errors import expect_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KIND = "bert-nli"
NOT_NLI = "bert-sequence-classification"  # NEGATIVE / POSITIVE: no entailment label
TEXTS = [*TRICKY_TEXTS, *CORPUS[::25], " ".join(CORPUS[:60])]  # the last one is truncated
LABELS = ["sports", "politics", "science", "music", "café culture", "旅行"]
OPTIONS = [
    {"candidate_labels": LABELS},
    {"candidate_labels": LABELS, "multi_label": True},
    {"candidate_labels": ["music"]},
    {"candidate_labels": LABELS[:3], "hypothesis_template": "Das Thema ist {}."},
]


@pytest.fixture(scope="module")
def exported(export):
    return export(KIND)


@pytest.fixture(scope="module")
def fp32_server(exported, export, start_server):
    return start_server(
        {KIND: exported, NOT_NLI: export(NOT_NLI, precisions=("fp32",))}, precision="fp32", intra_op_threads=1
    )


@pytest.fixture(scope="module")
def int8_server(exported, start_server):
    return start_server({KIND: exported}, precision="int8", intra_op_threads=1)


@cache
def reference(checkpoint):
    return pipeline("zero-shot-classification", model=str(checkpoint), device="cpu")


@pytest.mark.parametrize("options", OPTIONS, ids=["softmax", "multi-label", "one-label", "template"])
def test_zero_shot_matches_pipeline_fp32(client, exported, options):
    response = client.classify(model=KIND, texts=TEXTS, **options)
    assert len(response) == len(TEXTS)
    for served, text in zip(response, TEXTS, strict=True):
        expected = reference(exported.checkpoint)(text, **options)
        assert served.sequence == expected["sequence"] == text
        assert_ranking(
            [(x.label, x.score) for x in served.labels], list(zip(expected["labels"], expected["scores"], strict=True))
        )


def test_default_template_and_top_k(client):
    default = client.classify(model=KIND, texts=TEXTS, candidate_labels=LABELS)
    spelled = client.classify(
        model=KIND, texts=TEXTS, candidate_labels=LABELS, hypothesis_template="This example is {}.", top_k=2
    )
    for full, top in zip(default, spelled, strict=True):
        assert full.labels[:2] == top.labels
        assert sum(x.score for x in full.labels) == pytest.approx(1.0, abs=1e-5)


def test_int8_agrees_on_top1(int8_server, exported):
    texts = TEXTS + CORPUS[300:316]
    with int8_server.client() as client:
        response = client.classify(model=KIND, texts=texts, candidate_labels=LABELS)
    assert response.metadata.precision == "int8"
    expected = [
        list(zip(e["labels"], e["scores"], strict=True))
        for e in (reference(exported.checkpoint)(text, candidate_labels=LABELS) for text in texts)
    ]
    # The random NLI head barely tells hypotheses apart: fp32 puts 0 to 1.1e-6 between the best two
    # labels (exact ties included), and int8 moves scores by at most 2.1e-7 (measured). The best
    # label is the same for 37 of 41 texts, and for 41 of 41 counting near-ties as agreeing.
    for served, wanted in zip(response, expected, strict=True):
        scores = {x.label: x.score for x in served.labels}
        for label, score in wanted:
            assert abs(scores[label] - score) <= 1e-4
    assert tie_aware_agreement([r.label for r in response], expected) >= 0.95


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["entailment", "neutral", "contradiction"], (0, 2)),
        (["CONTRADICTION", "NEUTRAL", "ENTAILMENT"], (2, 0)),
        # Found by name where the pipeline would guess the last label (neutral).
        (["entailment", "contradiction", "neutral"], (0, 1)),
        # No contradiction label: the pipeline's guess.
        (["not_entailment", "entailment"], (1, 0)),
    ],
)
def test_nli_labels_are_found_by_name(labels, expected):
    assert nli_label_ids(labels) == expected


def test_model_without_entailment_label_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "entailment", "NEGATIVE, POSITIVE"):
        client.classify(model=NOT_NLI, texts=["x"], candidate_labels=["a", "b"])
    with pytest.raises(InvalidArgument, match="entailment"):
        nli_label_ids(["LABEL_0", "LABEL_1"])


@pytest.mark.parametrize(
    ("template", "words"),
    [("No placeholder.", ["no {}"]), ("About {topic}.", ["cannot be formatted", "topic"])],
    ids=["no-placeholder", "named-placeholder"],
)
def test_bad_template_is_invalid(client, template, words):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "hypothesis_template", *words):
        client.classify(model=KIND, texts=["x"], candidate_labels=LABELS, hypothesis_template=template)


def test_text_pairs_with_candidate_labels_are_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "text_pairs", "candidate_labels"):
        client.classify(model=KIND, texts=["x"], text_pairs=["y"], candidate_labels=LABELS)
