"""Metrics by model, RPC and status code; request ids echoed back; JSON logs that carry them."""

from __future__ import annotations

import json
import logging
import re
import shutil

import grpc
import pytest

from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.serving import ServerProcess, add_version, metric, wait_for

KIND = "bert-sequence-classification"
CLASSIFY = "onnxserve.v1.Inference/Classify"
ABSL_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")


@pytest.fixture(scope="module")
def exported(export):
    return {KIND: export(KIND, precisions=("fp32",))}


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported, settings={"metrics_port": 0})


def classify(target: str, model: str = KIND, metadata: tuple = ()) -> grpc.Call:
    """Calls Classify; returns the call, whose trailing metadata holds the request id."""
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ClassifyRequest(model=model, texts=["counted"] * 3)
        try:
            return stub.Classify.with_call(request, metadata=metadata, timeout=30)[1]
        except grpc.RpcError as error:
            return error


def test_requests_and_errors_by_model_rpc_and_code(server):
    port = server.server.metrics_port
    before = metric(port, "onnxserve_requests_total", model=KIND, rpc=CLASSIFY, code="OK")
    for _ in range(3):
        classify(server.target)
    classify(server.target, model="no-such-model")
    assert metric(port, "onnxserve_requests_total", model=KIND, rpc=CLASSIFY, code="OK") == before + 3
    # Names the server does not hold share one label value, so callers cannot grow the series.
    assert metric(port, "onnxserve_request_errors_total", model="", rpc=CLASSIFY, code="NOT_FOUND") >= 1
    assert metric(port, "onnxserve_request_errors_total", model=KIND, code="OK") == 0
    for histogram in ("request_duration_seconds", "queue_duration_seconds", "inference_duration_seconds"):
        assert metric(port, f"onnxserve_{histogram}_count", model=KIND) >= 3, histogram
    assert metric(port, "onnxserve_batch_size_sum", model=KIND) >= 9
    assert metric(port, "onnxserve_batch_tokens_count", model=KIND) >= 1


def test_model_state_and_queue_depth(server):
    port = server.server.metrics_port
    assert metric(port, "onnxserve_model_state", model=KIND, version="1", state="ready") == 1
    assert metric(port, "onnxserve_models_loaded") == 1
    assert metric(port, "onnxserve_queue_depth", model=KIND) == 0


def request_id(call: grpc.Call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def test_request_ids_are_echoed_or_made(server):
    assert request_id(classify(server.target, metadata=(("x-request-id", "caller-id-42"),))) == "caller-id-42"
    made = request_id(classify(server.target))
    assert len(made) == 32 and made != request_id(classify(server.target))
    # Ids that would not be safe in a log line are replaced; failed calls get one too.
    for unsafe in ("x" * 500, "a b; c=\"d\""):
        assert request_id(classify(server.target, metadata=(("x-request-id", unsafe),))) != unsafe
    assert request_id(classify(server.target, model="no-such-model"))


def test_json_logs_carry_the_request_id(exported, tmp_path):
    repository = tmp_path / "repository"
    add_version(exported[KIND], repository, KIND, 1)
    server = ServerProcess(
        "--repository", str(repository), "--log-format", "json", "--log-level", "debug",
        log_path=tmp_path / "server.log",
    )
    try:
        classify(server.target, metadata=(("x-request-id", "trace-me"),))
        server.terminate()
    finally:
        server.close()
    # gRPC's C core may write its own lines (absl's "I0101 12:00:00.000 ..."); the rest is ours.
    lines = [line for line in server.log_path.read_text().splitlines() if not ABSL_LINE.match(line)]
    entries = [json.loads(line) for line in lines]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    # stdout's start-up line is in the same format; SIGTERM is logged as it arrives, then the stop.
    started = json.loads(server.first_line)
    assert "listening on" in started["message"] and started["port"] == server.port
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("SIGTERM received: health NOT_SERVING") for m in messages), messages
    assert messages.index("drained: refusing new calls") < messages.index("stopped")
    access = [e for e in entries if e.get("request_id") == "trace-me"]
    assert access, "no entry carries the request id"
    assert access[0]["rpc"] == CLASSIFY and access[0]["code"] == "OK" and access[0]["model"] == KIND


def test_deleting_the_newest_version_logs_a_rollback(exported, start_server, tmp_path, caplog):
    repository = tmp_path / "repository"
    for version in (1, 2):
        add_version(exported[KIND], repository, KIND, version)
    server = start_server({}, settings={"repository": repository, "poll_interval_s": 0.1})
    with caplog.at_level(logging.INFO, logger="onnxserve.server.models.lifecycle"), server.client() as client:
        assert client.get_model(model=KIND).version == 2
        shutil.rmtree(repository / KIND / "2")
        wait_for(lambda: client.get_model(model=KIND).version == 1, what="version 1 serving again")
        wait_for(lambda: "unloaded" in caplog.text, what="version 2 unloaded")
    assert f"model {KIND} rolled back to version 1 (version 2 left the repository)" in caplog.messages
