"""A version whose graph changed after export is refused by its SHA-256, with the reason in
GetModel and the log; and readiness tells the truth about it: the inference services' health is
NOT_SERVING while a required model (by default, any model) has no READY version."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.repository import read_manifest
from tests.serving import add_version, wait_for

KIND = "bert-sequence-classification"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READINESS = ("onnxserve.v1.Inference", "inference.GRPCInferenceService")  # the deploy/ readiness probe's first
LIVENESS = ("", "onnxserve.v1.Models")


@pytest.fixture(scope="module")
def model(export):
    return export(KIND, precisions=("fp32",))


def health(target: str, *services: str) -> dict[str, int]:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {name: stub.Check(health_pb2.HealthCheckRequest(service=name)).status for name in services}


def server_ready(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        return v2_grpc.GRPCInferenceServiceStub(channel).ServerReady(v2.ServerReadyRequest()).ready


@pytest.fixture
def repository(model, tmp_path):
    """"good", and "tampered" whose graph has one byte flipped since export (same size)."""
    path = tmp_path / "repository"
    for name in ("good", "tampered"):
        add_version(model, path, name, 1)
    graph = path / "tampered" / "1" / read_manifest(path / "tampered" / "1").variants[0].files[0].path
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    return path


def test_a_flipped_byte_is_refused_and_the_server_is_not_ready(model, repository, start_server, caplog):
    with caplog.at_level(logging.ERROR):
        server = start_server({}, settings={"repository": repository, "poll_interval_s": 0.1})
    with server.client() as client:
        info = client.get_model(model="tampered")
        assert info.state == "failed"
        assert "SHA-256" in info.state_reason and "does not match the manifest" in info.state_reason
        assert ".onnx" in info.state_reason
        with pytest.raises(grpc.RpcError) as error:
            client.classify(model="tampered", texts=["x"])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "SHA-256" in error.value.details()
        assert client.classify(model="good", texts=["the others go on"])
    assert any("tampered" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    # Not ready (a readiness probe takes the replica out of its Service), but alive.
    assert health(server.target, *READINESS, "tampered") == dict.fromkeys((*READINESS, "tampered"), NOT_SERVING)
    assert health(server.target, *LIVENESS, "good") == dict.fromkeys((*LIVENESS, "good"), SERVING)
    assert not server_ready(server.target)
    # A good version dropped in heals it, and the server turns ready.
    add_version(model, repository, "tampered", 2)
    wait_for(lambda: health(server.target, *READINESS) == dict.fromkeys(READINESS, SERVING), what="readiness")
    assert server_ready(server.target)


def test_required_models_name_what_readiness_waits_for(repository, start_server):
    server = start_server({}, settings={"repository": repository, "required_models": ("good",)})
    assert health(server.target, *READINESS) == dict.fromkeys(READINESS, SERVING)
    assert health(server.target, "tampered") == {"tampered": NOT_SERVING}
    # A required model the repository does not hold keeps the server from being ready.
    server = start_server({}, settings={"repository": repository, "required_models": ("good", "absent")})
    assert health(server.target, *READINESS) == dict.fromkeys(READINESS, NOT_SERVING)
    assert not server_ready(server.target)
