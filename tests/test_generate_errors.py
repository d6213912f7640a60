"""Bad generation requests: INVALID_ARGUMENT with a message that names the field."""

from __future__ import annotations

import grpc
import pytest
from tokenizers import Tokenizer

CAUSAL = "gpt2-causal-lm"
SEQ2SEQ = "t5-seq2seq"
CONTEXT = 256  # the tiny checkpoints' positions (tests/checkpoints.py)


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({kind: export(kind, precisions=("fp32",)) for kind in (CAUSAL, SEQ2SEQ)})


@pytest.fixture(scope="module")
def client(server):
    with server.client() as client:
        yield client


@pytest.mark.parametrize("model", [CAUSAL, SEQ2SEQ])
@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"max_new_tokens": 0}, ["max_new_tokens", "at least 1"]),
        ({"max_new_tokens": 100_000}, ["max_new_tokens", "limit"]),
        ({"temperature": -0.5}, ["temperature", ">= 0"]),
        ({"top_p": 0.0}, ["top_p", "(0, 1]"]),
        ({"top_p": 1.5}, ["top_p", "(0, 1]"]),
        ({"num_beams": 0}, ["num_beams", "at least 1"]),
        ({"num_beams": 2**31}, ["num_beams", "limit of 64"]),
        ({"repetition_penalty": 0.0}, ["repetition_penalty"]),
        ({"stop": [""]}, ["stop", "empty"]),
    ],
)
def test_bad_parameters_are_invalid(client, model, settings, words):
    calls = [
        lambda: client.generate(model=model, prompts=["hello"], **settings),
        lambda: list(client.generate_stream(model=model, prompt="hello", **settings)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for word in words:
            assert word in raised.value.details()


@pytest.mark.parametrize("model", [CAUSAL, SEQ2SEQ])
def test_a_prompt_longer_than_the_context_is_invalid(client, model):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(model=model, prompts=["short", "word " * CONTEXT * 2])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts[1]" in raised.value.details()


def test_max_new_tokens_past_the_context_is_invalid_but_the_default_fits(server, client):
    tokenizer = Tokenizer.from_file(str(server.server.registry.get(CAUSAL).directory / "tokenizer.json"))
    tokenizer.no_truncation()
    prompt = next(p for p in (" the" * n for n in range(CONTEXT, 0, -1)) if len(tokenizer.encode(p).ids) < CONTEXT - 5)
    room = CONTEXT - len(tokenizer.encode(prompt).ids)
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(model=CAUSAL, prompts=[prompt], max_new_tokens=room + 1)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in raised.value.details()
    assert client.generate(model=CAUSAL, prompts=[prompt], max_new_tokens=room)[0].generated_tokens <= room
    # Unset, the default (20) shrinks to the room left.
    assert client.generate(model=CAUSAL, prompts=[prompt])[0].generated_tokens <= min(room, 20)


def test_an_empty_batch_is_invalid(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(model=CAUSAL, prompts=[])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts" in raised.value.details()


def test_too_many_sequences_in_one_request_is_invalid(client):
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(model=CAUSAL, prompts=["hello"] * 9, num_beams=32, max_new_tokens=2)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "288 sequences" in raised.value.details() and "limit of 256" in raised.value.details()
