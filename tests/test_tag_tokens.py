"""TagTokens at parity with transformers.pipeline("token-classification") on the same checkpoint."""

from __future__ import annotations

from functools import cache

import grpc
import pytest
from transformers import pipeline

from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.checkpoints import CORPUS
from tests.encoder_parity import agreement, assert_score, one_torch_thread  # noqa: F401 (a fixture)
from tests.parity import TRICKY_TEXTS
from tests.test_errors import expect_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KIND = "bert-token-classification"
KINDS = [KIND]
STRATEGIES = ["none", "simple", "first", "average", "max"]
TEXTS = [
    *TRICKY_TEXTS,
    *CORPUS[::15],
    "Ada Lovelace and Björn visited the United Nations in Reykjavík 🚀",
    "我的朋友在Zürich喝了一杯咖啡 ☕ and met François at Microsoft.",
    " ".join(CORPUS[:60]),  # longer than the model's 512 tokens: truncated, as the pipeline does
]
# Empty means ["O"]; a label no model has keeps every token, O included.
IGNORE = [[], ["O", "B-PER"], ["PER", "LOC"], ["NOTHING"]]


@cache
def reference(checkpoint, strategy: str):
    return pipeline("token-classification", model=str(checkpoint), aggregation_strategy=strategy, device="cpu")


def served_fields(entity, strategy: str) -> tuple:
    if strategy == "none":
        return entity.entity, entity.word, entity.start, entity.end, entity.index
    return entity.entity_group, entity.word, entity.start, entity.end


def expected_fields(entity: dict, strategy: str) -> tuple:
    if strategy == "none":
        return entity["entity"], entity["word"], entity["start"], entity["end"], entity["index"]
    return entity["entity_group"], entity["word"], entity["start"], entity["end"]


def assert_matches_pipeline(client, checkpoint, texts: list[str], strategy: str, ignore: list[str]) -> None:
    response = client.tag_tokens(model=KIND, texts=texts, aggregation=strategy, ignore_labels=ignore)
    assert len(response) == len(texts)
    for served, text in zip(response, texts, strict=True):
        expected = reference(checkpoint, strategy)(text, ignore_labels=ignore or ["O"])
        assert [served_fields(e, strategy) for e in served] == [expected_fields(e, strategy) for e in expected]
        for got, want in zip(served, expected, strict=True):
            assert_score(got.score, want["score"])
    # The random head tags plenty, so the comparison is not vacuous.
    assert sum(len(entities) for entities in response) >= len(texts)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_entities_match_pipeline_fp32(client, exported, strategy):
    assert_matches_pipeline(client, exported[KIND].checkpoint, TEXTS, strategy, [])


@pytest.mark.parametrize("strategy", ["none", "simple", "average"])
@pytest.mark.parametrize("ignore", IGNORE[1:], ids="+".join)
def test_ignore_labels_match_pipeline_fp32(client, exported, strategy, ignore):
    assert_matches_pipeline(client, exported[KIND].checkpoint, TEXTS[:12], strategy, ignore)


def test_default_aggregation_is_simple(client):
    default = client.tag_tokens(model=KIND, texts=TEXTS[:5], aggregation=None)
    simple = client.tag_tokens(model=KIND, texts=TEXTS[:5], aggregation="simple")
    assert default.results == simple.results
    assert any(entity.entity_group for entities in default for entity in entities)


def test_entity_spans_slice_the_text_and_words_merge_subwords(client):
    response = client.tag_tokens(model=KIND, texts=TEXTS, aggregation="first", ignore_labels=["NOTHING"])
    for entities, text in zip(response, TEXTS, strict=True):
        for entity in entities:
            assert "##" not in entity.word
            assert text[entity.start : entity.end].replace(" ", "") == entity.word.replace(" ", "")


def test_int8_agrees_on_top1(int8_server, exported):
    texts = TEXTS + CORPUS[200:220]
    with int8_server.client() as client:
        response = client.tag_tokens(model=KIND, texts=texts, aggregation="none", ignore_labels=["NOTHING"])
    assert response.metadata.precision == "int8"
    served = [entity.entity for entities in response for entity in entities]
    classify = reference(exported[KIND].checkpoint, "none")
    expected = [x["entity"] for text in texts for x in classify(text, ignore_labels=[])]
    # Measured: 1,371 of 1,384 tokens (99.1%) get the same label.
    assert agreement(served, expected) >= 0.97


def test_unknown_aggregation_is_invalid(fp32_server):
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.TagTokensRequest(model=KIND, texts=["x"], aggregation_strategy=42)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "aggregation_strategy 42"):
            stub.TagTokens(request, timeout=30)


def test_empty_batch_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "no texts"):
        client.tag_tokens(model=KIND, texts=[])
