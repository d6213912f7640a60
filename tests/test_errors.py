"""Bad input gets a clear status and a message that names the problem, never a crash."""

from __future__ import annotations

import grpc
import pytest

KIND = "bert-sequence-classification"
ENCODER = "bert-feature-extraction"


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({KIND: export(KIND, precisions=("fp32",)), ENCODER: export(ENCODER, precisions=("fp32",))})


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def expect_status(code: grpc.StatusCode, *words: str):
    """Asserts the call fails with `code` and a message holding every one of `words`."""

    class Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, traceback):
            assert isinstance(error, grpc.RpcError), f"expected {code.name}, the call succeeded"
            assert error.code() == code, error.details()
            for word in words:
                assert word in error.details(), error.details()
            return True

    return Check()


def test_unknown_model_is_not_found(client):
    with expect_status(grpc.StatusCode.NOT_FOUND, "nope", KIND):
        client.classify(model="nope", texts=["x"])


def test_unknown_version_is_not_found(client):
    with expect_status(grpc.StatusCode.NOT_FOUND, "version 7", "[1]"):
        client.classify(model=KIND, texts=["x"], version=7)
    with expect_status(grpc.StatusCode.NOT_FOUND):
        client.get_model(model=KIND, version=7)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.classify(model=KIND, texts=[]),
        lambda c: c.encode(model=ENCODER, texts=[]),
        lambda c: c.tokenize(model=KIND, texts=[]),
        lambda c: c.detokenize(model=KIND, sequences=[]),
    ],
)
def test_empty_batch_is_invalid(client, call):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "no "):
        call(client)


@pytest.mark.parametrize(
    ("call", "rpc"),
    [
        (lambda c: c.encode(model=KIND, texts=["x"]), "Encode"),
        (lambda c: c.classify(model=ENCODER, texts=["x"]), "Classify"),
        (lambda c: c.fill_mask(model=KIND, texts=["x [MASK]"]), "FillMask"),
        (lambda c: c.answer(model=KIND, questions=["q"], contexts=["c"]), "Answer"),
        (lambda c: c.tag_tokens(model=KIND, texts=["x"]), "TagTokens"),
        (lambda c: c.generate(model=KIND, prompts=["x"]), "Generate"),
        (lambda c: list(c.generate_stream(model=KIND, prompt="x")), "GenerateStream"),
    ],
)
def test_rpc_the_task_does_not_serve_is_invalid(client, call, rpc):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, rpc, "serves"):
        call(client)


def test_too_long_input_is_truncated_by_default(client):
    long_text = "word " * 2000
    response = client.classify(model=KIND, texts=[long_text])
    assert response.metadata.tokens == client.get_model(model=KIND).max_input_length


def test_too_long_input_without_truncation_is_invalid(client):
    long_text = "word " * 2000
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "input 1", "truncation is off"):
        client.classify(model=KIND, texts=["short", long_text], truncate=False)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "truncation is off"):
        client.encode(model=ENCODER, texts=[long_text], truncate=False)


def test_mismatched_text_pairs_are_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "text_pairs", "texts"):
        client.classify(model=KIND, texts=["a", "b"], text_pairs=["only one"])


def test_ids_outside_the_vocabulary_are_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"):
        client.detokenize(model=KIND, sequences=[[1, 2, 10_000_000]])


def test_server_keeps_serving_after_errors(client):
    with expect_status(grpc.StatusCode.NOT_FOUND):
        client.classify(model="nope", texts=["x"])
    assert len(client.classify(model=KIND, texts=["still fine"])) == 1


def test_tokenize_max_length_over_the_model_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "max_length", "maximum"):
        client.tokenize(model=KIND, texts=["x"], max_length=10_000_000, padding="max_length")


def test_unknown_padding_value_is_invalid(server):
    from onnxserve.v1 import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(server.target) as channel, expect_status(grpc.StatusCode.INVALID_ARGUMENT, "padding"):
        # An enum value from a newer contract than the server's.
        inference_pb2_grpc.InferenceStub(channel).Tokenize(
            inference_pb2.TokenizeRequest(model=KIND, texts=["x"], padding=4), timeout=30
        )
