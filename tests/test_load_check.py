"""The gate travels with the artifact: at load, each variant runs the export's probes on this
machine and a variant that misses the export's gate is refused, the model serving fp32 instead,
with the figures in GetModel, the log and the metrics; serve_refused_variants serves it anyway."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxserve.export.writer import sha256

from onnxserve.repository import read_manifest, write_manifest
from onnxserve.v1 import common_pb2, models_pb2, models_pb2_grpc
from tests.serving import add_version, metric

KIND = "bert-sequence-classification"


@pytest.fixture(scope="module")
def model(export):
    return export(KIND, precisions=("fp32", "int8"))


def _degrade(graph_path) -> None:
    """The logits pushed apart by a constant: a graph that loads and runs, and answers wrong."""
    graph = onnx.load(str(graph_path))
    logits = next(output for output in graph.graph.output if output.name == "logits")
    for node in graph.graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    shift = numpy_helper.from_array(np.array([[-10.0, 10.0]], np.float32), "logits_shift")
    graph.graph.initializer.append(shift)
    graph.graph.node.append(onnx.helper.make_node("Add", ["logits_raw", "logits_shift"], [logits.name]))
    onnx.save(graph, str(graph_path))


@pytest.fixture
def repository(model, tmp_path):
    """"good", and "degraded" whose int8 graph was swapped for a wrong one, its hash updated."""
    path = tmp_path / "repository"
    for name in ("good", "degraded"):
        add_version(model, path, name, 1)
    version = path / "degraded" / "1"
    manifest = read_manifest(version)
    int8 = next(v for v in manifest.variants if v.precision == common_pb2.PRECISION_INT8)
    _degrade(version / int8.files[0].path)
    int8.files[0].sha256 = sha256(version / int8.files[0].path)
    write_manifest(version, manifest)
    return path


def _info(target: str, name: str) -> models_pb2.ModelInfo:
    with grpc.insecure_channel(target) as channel:
        return models_pb2_grpc.ModelsStub(channel).GetModel(models_pb2.GetModelRequest(model=name))


def test_a_variant_that_misses_its_gate_here_is_refused_and_fp32_served(repository, start_server, caplog):
    with caplog.at_level(logging.WARNING):
        server = start_server({}, settings={"repository": repository, "metrics_port": 0})
    degraded, good = _info(server.target, "degraded"), _info(server.target, "good")
    assert good.precision == common_pb2.PRECISION_INT8 and not good.refused_variants
    assert good.load_check.passed and good.load_check.samples > 0
    assert degraded.state == models_pb2.MODEL_STATE_READY
    assert degraded.precision == common_pb2.PRECISION_FP32 and degraded.load_check.passed
    (refused,) = degraded.refused_variants
    assert refused.precision == common_pb2.PRECISION_INT8 and not refused.load_check.passed
    assert any(failure.startswith("mean_cosine") for failure in refused.load_check.failures)
    assert "avx2" in degraded.serving_machine.cpu_features
    assert degraded.serving_machine.execution_provider == "CPUExecutionProvider"
    warning = next(r.getMessage() for r in caplog.records if "refused the int8 variant" in r.getMessage())
    assert "degraded" in warning and "mean_cosine" in warning and "avx2" in warning
    port = server.server.metrics_port
    assert metric(port, "onnxserve_variant_refused", model="degraded", precision="int8") == 1
    assert metric(port, "onnxserve_variant_refused", model="good") == 0
    with server.client() as client:
        assert client.get_model(model="degraded").refused_variants.keys() == {"int8"}
        assert client.classify(model="degraded", texts=["still answers, in fp32"])


def test_serve_refused_variants_serves_it_anyway_and_says_so(repository, start_server, caplog):
    with caplog.at_level(logging.WARNING):
        server = start_server({}, settings={"repository": repository}, serve_refused_variants=True)
    degraded = _info(server.target, "degraded")
    assert degraded.precision == common_pb2.PRECISION_INT8 and not degraded.load_check.passed
    assert not degraded.refused_variants
    assert any("served anyway" in r.getMessage() and "degraded" in r.getMessage() for r in caplog.records)


def test_a_version_whose_probes_changed_is_refused(repository, start_server):
    version = repository / "good" / "1"
    probes = version / read_manifest(version).probes.path
    data = bytearray(probes.read_bytes())
    data[len(data) // 2] ^= 0x01
    probes.write_bytes(bytes(data))
    server = start_server({}, settings={"repository": repository})
    info = _info(server.target, "good")
    assert info.state == models_pb2.MODEL_STATE_FAILED
    assert "probes.npz" in info.state_reason and "SHA-256" in info.state_reason


def test_a_decoder_is_checked_on_greedy_prefixes_and_perplexity(export, start_server):
    """Decoders' probes: every gate prompt's first 16 greedy tokens and the perplexity text."""
    server = start_server({"llama": export("llama-causal-lm", precisions=("fp32",))})
    check = _info(server.target, "llama").load_check
    assert check.passed and len(check.greedy_agreement) == len(check.reference_tokens) == 6
    assert list(check.greedy_agreement) == list(check.reference_tokens)  # fp32 agrees all the way
    assert all(0 < tokens <= 16 for tokens in check.reference_tokens)
    assert check.perplexity == pytest.approx(check.reference_perplexity, rel=1e-3)
