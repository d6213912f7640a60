"""Per-request work bounded upfront: a request over max_inputs_per_request, or whose answer could
not fit the server's largest response, is refused with INVALID_ARGUMENT naming the limit before
any tokenizing or inference; GetModel reports both limits; and the Python and Node clients receive
answers as large as the server may send (gRPC's own default would stop at 4 MiB)."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.checkpoints import CORPUS
from tests.node_tools import node_client

KIND = "bert-feature-extraction"
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def exported(export):
    return export(KIND, precisions=("fp32",))


@pytest.fixture(scope="module")
def small_server(exported, start_server):
    """At most 8 inputs per request, and responses of at most 16 KiB (the tiny BERT's Encode
    answer is 128 bytes a text: 129 texts could not fit)."""
    return start_server({KIND: exported}, settings={"max_send_message_bytes": 16 * 1024}, max_inputs_per_request=8)


def record_work(server, monkeypatch) -> list[str]:
    """Every text the model's pipeline is asked to tokenize from now on."""
    pipeline = server.server.registry.get(KIND).pipeline
    seen: list[str] = []
    preprocess = pipeline.preprocess

    def recording(request):
        seen.extend(request.texts)
        return preprocess(request)

    monkeypatch.setattr(pipeline, "preprocess", recording)
    return seen


@pytest.fixture
def work_seen(small_server, monkeypatch):
    return record_work(small_server, monkeypatch)


def test_a_request_over_the_input_limit_is_refused_before_any_work(small_server, work_seen):
    with small_server.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.encode(model=KIND, texts=CORPUS[:9])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "9 texts" in refused.value.details() and "max_inputs_per_request" in refused.value.details()
    assert "limit of 8" in refused.value.details()
    assert work_seen == []
    with small_server.client() as client:  # the limit itself is allowed
        assert len(client.encode(model=KIND, texts=CORPUS[:8]).results) == 8
    assert work_seen == CORPUS[:8]


def test_the_input_limit_covers_other_rpcs_too(small_server):
    with small_server.client() as client:
        for call in (lambda: client.tokenize(model=KIND, texts=CORPUS[:9]),
                     lambda: client.detokenize(model=KIND, sequences=[[1, 2]] * 9)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_inputs_per_request" in refused.value.details()


def test_an_answer_that_could_not_fit_the_send_limit_is_refused_before_any_work(
    exported, start_server, monkeypatch
):
    server = start_server({KIND: exported}, settings={"max_send_message_bytes": 16 * 1024})
    seen = record_work(server, monkeypatch)
    texts = CORPUS[:129]  # 129 x 32 floats x 4 bytes: over 16 KiB before any framing
    with server.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.encode(model=KIND, texts=texts)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert "16512 bytes (128 per input)" in details and "max_send_message_bytes" in details
    assert "at most 128 per call" in details
    assert seen == []


def test_get_model_reports_the_limits(small_server, exported, start_server):
    with small_server.client() as client:
        info = client.get_model(KIND)
    assert (info.max_inputs_per_request, info.max_response_bytes) == (8, 16 * 1024)
    with start_server({KIND: exported}).client() as client:
        info = client.get_model(KIND)
    assert (info.max_inputs_per_request, info.max_response_bytes) == (2048, 64 * 1024 * 1024)


@pytest.fixture(scope="module")
def large_answer(exported, start_server):
    """A server with its default limits, and a Tokenize request whose answer passes 4 MiB."""
    server = start_server({KIND: exported})
    texts = [" ".join(CORPUS)[:4000]] * 600  # 2.4 MB asked, truncated to 512 tokens each
    request = inference_pb2.TokenizeRequest(model=KIND, texts=texts)
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.target, options) as channel:
        size = inference_pb2_grpc.InferenceStub(channel).Tokenize(request, timeout=120).ByteSize()
    assert GRPC_DEFAULT_RECEIVE < size < 64 * 1024 * 1024
    return server, texts


def test_the_python_client_receives_what_the_server_may_send(large_answer):
    server, texts = large_answer
    with server.client() as client:
        assert len(client.tokenize(model=KIND, texts=texts)) == len(texts)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        inference_pb2_grpc.InferenceStub(channel).Tokenize(inference_pb2.TokenizeRequest(model=KIND, texts=texts))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # what a bare channel does


def test_the_node_client_receives_what_the_server_may_send(large_answer):
    server, texts = large_answer
    script = (
        "const { OnnxServeClient } = require('./index.js');"
        "const [target, model, text, count] = process.argv.slice(1);"
        "const client = new OnnxServeClient(target, { timeoutMs: 120000 });"
        "client.tokenize({ model, texts: Array(Number(count)).fill(text) })"
        ".then((r) => { console.log(JSON.stringify({ results: r.encodings.length })); client.close(); })"
        ".catch((e) => { console.error(e.message); process.exit(1); });"
    )
    result = subprocess.run(
        ["node", "-e", script, server.target, KIND, texts[0], str(len(texts))],
        cwd=node_client(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"results": len(texts)}
