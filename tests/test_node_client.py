"""The Node.js client (client/node) against a real server: Encode, Classify and GenerateStream,
compared with the Python client's answers, and its example type-checked against index.d.ts."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.node_tools import bin_path, node_client

ENCODER = "bert-feature-extraction"
CLASSIFIER = "bert-sequence-classification"
GENERATOR = "gpt2-causal-lm"
TEXTS = ["A man is eating food.", "Café au lait 🙂"]  # as examples/call.js sends them


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({kind: export(kind, precisions=("fp32",)) for kind in (ENCODER, CLASSIFIER, GENERATOR)})


@pytest.fixture(scope="module")
def report(server) -> dict:
    directory = node_client()
    result = subprocess.run(
        ["node", "examples/call.js", server.target, ENCODER, CLASSIFIER, GENERATOR],
        cwd=directory, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_encode(report, server):
    with server.client() as client:
        expected = client.encode(model=ENCODER, texts=TEXTS, normalize=True)
    embeddings = report["encode"]["result"]["embeddings"]
    np.testing.assert_allclose([e["values"] for e in embeddings], expected.results, rtol=1e-6)
    assert report["encode"]["result"]["metadata"]["model"] == ENCODER


def test_classify(report, server):
    with server.client() as client:
        expected = client.classify(model=CLASSIFIER, texts=TEXTS, top_k=1)
    results = report["classify"]["result"]["results"]
    assert [r["labels"][0]["label"] for r in results] == [r.labels[0].label for r in expected]
    assert [r["labels"][0]["score"] for r in results] == pytest.approx([r.labels[0].score for r in expected])


def test_generate_stream(report, server):
    pieces = report["generateStream"]["result"]
    with server.client() as client:
        expected = client.generate(model=GENERATOR, prompts=["Hello"], max_new_tokens=5)
    assert "".join(p["text"] for p in pieces) == expected.results[0].generated_text
    assert pieces[-1]["generatedText"] == expected.results[0].generated_text
    assert pieces[-1]["finishReason"] != "FINISH_REASON_UNSPECIFIED"
    assert all(p["finishReason"] == "FINISH_REASON_UNSPECIFIED" for p in pieces[:-1])


def test_example_type_checks_against_the_declarations():
    result = subprocess.run([str(bin_path("tsc")), "-p", "."], cwd=node_client(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
