"""tritonclient, a v2 client nobody here wrote, talks to onnxserve: liveness, readiness, server
and model metadata, and inferences with raw INT64 tensors and with BYTES text. It runs from its own
venv in a separate process, as an outside client would (it pins protobuf below 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

import onnxserve
from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "build" / "venvs" / "tritonclient"
REQUIREMENT = "tritonclient[grpc]>=2.50,<3"
SCRIPT = Path(__file__).resolve().parent / "clients" / "tritonclient_calls.py"
MODEL = "bert-sequence-classification"


@pytest.fixture(scope="module")
def triton_python() -> Path:
    """The tritonclient venv's python, created on first use; skipped where PyPI is unreachable."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == REQUIREMENT:
        return python
    steps = ([sys.executable, "-m", "venv", "--clear", str(VENV)], [str(python), "-m", "pip", "install", REQUIREMENT])
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"cannot create the tritonclient venv (is PyPI reachable?): {result.stderr.strip()[-800:]}")
    stamp.write_text(REQUIREMENT)
    return python


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({MODEL: export(MODEL, precisions=("fp32",))})


@pytest.fixture(scope="module")
def report(triton_python, server) -> dict:
    result = subprocess.run(
        [str(triton_python), str(SCRIPT), server.target, MODEL], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_liveness_and_readiness(report):
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True


def test_server_and_model_metadata(report):
    assert report["server_metadata"]["name"] == "onnxserve"
    assert report["server_metadata"]["version"] == onnxserve.__version__
    metadata = report["model_metadata"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (MODEL, ["1"], "onnxruntime_onnx")
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "input_ids": "INT64", "attention_mask": "INT64", "token_type_ids": "INT64"
    }
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "2"]}]


def test_raw_tensor_inference_runs_the_graph(report, server):
    ids = np.array(report["ids"], dtype=np.int64)
    request = v2.ModelInferRequest(model_name=MODEL)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    for name, value in feeds.items():
        request.inputs.add(name=name, datatype="INT64", shape=value.shape).contents.int64_contents.extend(value.flat)
    with grpc.insecure_channel(server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    expected = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 2)
    np.testing.assert_allclose(report["logits"], expected, rtol=1e-6)
    assert report["request_id"] == "t1"


def test_bytes_text_inference_runs_the_pipeline(report, server):
    texts = ["I love this.", "Café au lait 🙂"]
    with grpc.insecure_channel(server.target) as channel:
        classified = inference_pb2_grpc.InferenceStub(channel).Classify(
            inference_pb2.ClassifyRequest(model=MODEL, texts=texts, top_k=1)
        )
    assert report["text"]["label"] == [[r.labels[0].label] for r in classified.results]
    np.testing.assert_allclose(report["text"]["score"], [[r.labels[0].score] for r in classified.results], rtol=1e-5)


def test_errors_reach_the_client_with_their_status(report):
    assert report["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in report["unknown_model"]["message"]
