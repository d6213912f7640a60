"""Models service, health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from transformers import AutoConfig

CLASSIFIER = "bert-sequence-classification"
ENCODER = "roberta-feature-extraction"


@pytest.fixture(scope="module")
def exported(export):
    return {CLASSIFIER: export(CLASSIFIER), ENCODER: export(ENCODER, precisions=("fp32",))}


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported)


def test_list_models(server):
    with server.client() as client:
        models = client.list_models()
    assert [(m.name, m.version, m.state) for m in models] == [(CLASSIFIER, 1, "ready"), (ENCODER, 1, "ready")]


def test_get_model_describes_how_it_is_served(server, exported):
    config = AutoConfig.from_pretrained(exported[CLASSIFIER].checkpoint)
    with server.client() as client:
        info = client.get_model(model=CLASSIFIER)
        encoder = client.get_model(model=ENCODER)
    assert info.task == "text_classification"
    assert info.labels == [config.id2label[i] for i in range(config.num_labels)]
    # On the CPU the default precision is int8, the provider the one the session really uses.
    assert info.precision == "int8" and info.execution_provider == "CPUExecutionProvider"
    assert set(info.available_precisions) == {"fp32", "int8"}
    assert info.max_input_length == 512
    assert info.version == 1 and info.versions == [1]
    assert info.architecture == "BertForSequenceClassification"
    # Falls back to fp32 when the int8 variant was not exported.
    assert encoder.precision == "fp32" and encoder.task == "feature_extraction"
    assert encoder.pooling == "mean" and encoder.hidden_size == AutoConfig.from_pretrained(
        exported[ENCODER].checkpoint
    ).hidden_size


def test_health_reports_overall_and_per_model(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "onnxserve.v1.Inference", CLASSIFIER, ENCODER):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_both_services(server):
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        database = ProtoReflectionDescriptorDatabase(channel)
        inference = database.FindFileContainingSymbol("onnxserve.v1.Inference")
    assert {"onnxserve.v1.Inference", "onnxserve.v1.Models", "grpc.health.v1.Health"} <= services
    assert "Encode" in [m.name for m in inference.service[0].method]
