"""FillMask at parity with transformers.pipeline("fill-mask") on the same checkpoint."""

from __future__ import annotations

from functools import cache

import grpc
import pytest
from transformers import pipeline

from tests.checkpoints import CORPUS
from tests.encoder_parity import agreement, assert_score, one_torch_thread  # noqa: F401 (a fixture)
from tests.test_errors import expect_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["bert-fill-mask", "roberta-fill-mask"]
MASK_TOKENS = {"bert-fill-mask": "[MASK]", "roberta-fill-mask": "<mask>"}
# "{}" marks where the model's own mask token goes.
TEMPLATES = [
    "The cat {} the museum.",
    "{} loved the café in Zürich 🙂",
    "我{}北京的博物馆。",
    "Naïve    {}  deserve   patient answers.",
    "{}",
    "{} visited {} in {}.",
    "🙂🙂🚀 {} day! São Paulo {} several spaces.",
    " ".join(CORPUS[:12]) + " The {} was closed.",
] + [sentence.replace(" the ", " {} ", 1) for sentence in CORPUS[20:80:4] if " the " in sentence]
# For int8 agreement: more masks, so the measured rate means something.
INT8_TEMPLATES = TEMPLATES + [f"{sentence} {{}}" for sentence in CORPUS[100:160]]
TARGETS = ["the", "museum", "café", "Zürich", "🙂"]
OPTIONS = [{}, {"top_k": 3}, {"top_k": 8, "targets": TARGETS}, {"top_k": 2, "targets": TARGETS}]


@cache
def reference(checkpoint):
    return pipeline("fill-mask", model=str(checkpoint), device="cpu")


def masked(kind: str, templates: list[str]) -> list[str]:
    return [template.replace("{}", MASK_TOKENS[kind]) for template in templates]


def expected_masks(checkpoint, text: str, **options) -> list[list[dict]]:
    """The pipeline's result as one candidate list per mask (it flattens a single mask's)."""
    result = reference(checkpoint)(text, **options)
    return [result] if isinstance(result[0], dict) else result


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "top_k=3", "targets-top_k=8", "targets-top_k=2"])
def test_fill_mask_matches_pipeline_fp32(client, exported, kind, options):
    texts = masked(kind, TEMPLATES)
    response = client.fill_mask(model=kind, texts=texts, **{"top_k": 5, **options})
    assert len(response) == len(texts)
    for served, text in zip(response, texts, strict=True):
        expected = expected_masks(exported[kind].checkpoint, text, **options)
        assert len(served) == text.count(MASK_TOKENS[kind]) == len(expected)
        for candidates, wanted in zip(served, expected, strict=True):
            assert [(c.token, c.token_str, c.sequence) for c in candidates] == [
                (w["token"], w["token_str"], w["sequence"]) for w in wanted
            ]
            for got, want in zip(candidates, wanted, strict=True):
                assert_score(got.score, want["score"])


@pytest.mark.parametrize("kind", KINDS)
def test_mask_token_is_the_models_own(client, kind):
    assert client.get_model(model=kind).mask_token == MASK_TOKENS[kind]


def test_top_k_zero_means_five(client):
    response = client.fill_mask(model="bert-fill-mask", texts=masked("bert-fill-mask", TEMPLATES[:3]), top_k=0)
    assert [len(masks[0]) for masks in response] == [5, 5, 5]


def test_several_masks_keep_the_others_visible(client):
    kind = "roberta-fill-mask"
    response = client.fill_mask(model=kind, texts=masked(kind, ["{} visited {} in {}."]))
    for candidate in response[0][0]:
        # Each mask is filled alone; the pipeline then shows special tokens, other masks included.
        assert candidate.sequence.count("<mask>") == 2 and candidate.sequence.startswith("<s>")


@pytest.mark.parametrize("kind", KINDS)
def test_int8_agrees_on_top1(int8_server, exported, kind):
    texts = masked(kind, INT8_TEMPLATES)
    with int8_server.client() as client:
        response = client.fill_mask(model=kind, texts=texts, top_k=1)
    assert response.metadata.precision == "int8"
    served = [candidates[0].token for masks in response for candidates in masks]
    expected = [w[0]["token"] for text in texts for w in expected_masks(exported[kind].checkpoint, text)]
    # Measured: 76 of 79 (BERT) and 79 of 79 (RoBERTa) masks get the same best token. Random MLM
    # heads are nearly flat, so int8 noise can reorder close candidates.
    assert agreement(served, expected) >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_text_without_mask_is_invalid_and_names_the_mask_token(client, kind):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "text 1", "no mask token", MASK_TOKENS[kind]):
        client.fill_mask(model=kind, texts=[*masked(kind, ["a {} b"]), "no mask here"])


def test_the_other_models_mask_token_is_not_a_mask(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "text 0", "<mask>"):
        client.fill_mask(model="roberta-fill-mask", texts=["The cat [MASK] the museum."])


def test_targets_outside_the_vocabulary_are_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "targets", "vocabulary"):
        client.fill_mask(model="bert-fill-mask", texts=["a [MASK] b"], targets=["", " "])


def test_too_long_text_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "truncation is off"):
        client.fill_mask(model="bert-fill-mask", texts=["word " * 600 + "[MASK]"])


def test_empty_batch_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "no texts"):
        client.fill_mask(model="bert-fill-mask", texts=[])
