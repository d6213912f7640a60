"""Encode at parity with pooling done in PyTorch on the same checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoints import CORPUS
from tests.parity import TRICKY_TEXTS, cosine, pooled_embeddings

KINDS = ["bert-feature-extraction", "distilbert-feature-extraction", "roberta-feature-extraction"]
TEXTS = TRICKY_TEXTS + CORPUS[:9]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
@pytest.mark.parametrize("normalize", [False, True])
def test_encode_matches_pytorch_pooling(fp32_server, exported, kind, pooling, normalize):
    with fp32_server.client() as client:
        response = client.encode(model=kind, texts=TEXTS, pooling=pooling, normalize=normalize)
    expected = pooled_embeddings(exported[kind].checkpoint, TEXTS, pooling, normalize)
    served = np.array(response.results)
    assert served.shape == expected.shape
    np.testing.assert_allclose(served, expected, atol=1e-4, rtol=1e-3)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_int8_stays_close_to_pytorch(int8_server, exported, kind):
    with int8_server.client() as client:
        response = client.encode(model=kind, texts=TEXTS)
    assert response.metadata.precision == "int8"
    expected = pooled_embeddings(exported[kind].checkpoint, TEXTS, "mean", False)
    assert cosine(np.array(response.results), expected).min() > 0.95


def test_encode_metadata_counts_tokens_and_times_stages(fp32_server, exported):
    kind = KINDS[0]
    with fp32_server.client() as client:
        response = client.encode(model=kind, texts=["one two", "three"])
        tokens = client.tokenize(model=kind, texts=["one two", "three"])
    metadata = response.metadata
    assert metadata.model == kind and metadata.version == 1
    assert metadata.tokens == sum(len(e.input_ids) for e in tokens)
    assert metadata.tokenization_ns > 0 and metadata.inference_ns > 0 and metadata.postprocess_ns > 0
    stages = metadata.tokenization_ns + metadata.queue_ns + metadata.inference_ns + metadata.postprocess_ns
    assert metadata.total_ns >= stages
    assert metadata.execution_provider == "CPUExecutionProvider"
    assert metadata.batch_size == 2


def test_encode_results_keep_input_order_across_runs(exported, start_server):
    """Sequences are sorted by length into runs of at most 2; results must come back in order."""
    kind = KINDS[0]
    server = start_server({kind: exported[kind]}, precision="fp32", max_batch_size=2)
    with server.client() as client:
        batched = np.array(client.encode(model=kind, texts=TEXTS).results)
        alone = np.array([client.encode(model=kind, texts=[t]).results[0] for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


@pytest.mark.parametrize("hidden", [1, 16, 32, 384, 4097])  # varint lengths of one, two and three bytes
def test_responses_built_from_packed_rows_equal_the_float_by_float_ones(hidden):
    from onnxserve.server.tasks.feature_extraction import embeddings_response

    from onnxserve.v1 import inference_pb2

    vectors = np.random.default_rng(hidden).standard_normal((5, hidden)).astype(np.float32)
    vectors[0, 0] = np.float32(-0.0)
    expected = inference_pb2.EncodeResponse()
    for vector in vectors:
        expected.embeddings.add().values.extend(vector.tolist())
    built = embeddings_response(vectors)
    assert built == expected
    assert built.SerializeToString() == expected.SerializeToString()
    assert np.array_equal(np.array([e.values for e in built.embeddings], dtype=np.float32), vectors)


def test_small_requests_are_tokenized_on_the_loop_and_large_ones_off_it(exported, start_server, monkeypatch):
    """A few short texts cost less to tokenize than a thread pool's round trip; a large request
    must not hold the event loop (and every other call) while it tokenizes."""
    import threading

    from onnxserve.server.tasks.base import INLINE_REQUEST_BYTES

    kind = KINDS[0]
    server = start_server({kind: exported[kind]})
    pipeline = server.server.registry.get(kind).pipeline
    threads: list[str] = []
    preprocess = pipeline.preprocess

    def recording(request):
        threads.append(threading.current_thread().name)
        return preprocess(request)

    monkeypatch.setattr(pipeline, "preprocess", recording)
    small, large = [CORPUS[0]], CORPUS[: INLINE_REQUEST_BYTES // 8]
    assert len(" ".join(large)) > INLINE_REQUEST_BYTES
    with server.client() as client:
        for texts in (small, large):
            assert len(client.encode(model=kind, texts=texts).results) == len(texts)
    assert threads[0] == server.thread.name and threads[1] != server.thread.name
