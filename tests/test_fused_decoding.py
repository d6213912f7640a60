"""Generate on the fused decoder graph (docs/decoder-graph.md), which Llama-family exports get,
served by the fused step model on preallocated KV buffers: greedy and beam search ids equal
transformers' generate(), rows of a left-padded batch equal their solo runs, and seeded sampling
is reproducible. Continuous batching is off here (max_generation_rows 0): every request runs on a step model of
its own; tests/test_continuous_batching.py covers the shared batch."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
from onnxserve.server.tasks.generation import causal
from onnxserve.server.tasks.generation.fused import FusedGraph, is_fused

from tests import generation_reference as reference
from tests.conftest import Exported
from tests.generation_reference import PROMPTS

# Llama with grouped-query attention; Gemma 3 with sliding windows, q/k norms and a softcap.
KINDS = ["llama-causal-lm", "gemma3-causal-lm"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(export: Callable[..., Exported]) -> dict[str, Exported]:
    return {kind: export(kind, precisions=("fp32",)) for kind in KINDS}


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported, precision="fp32", intra_op_threads=1, max_generation_rows=0)


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def served_ids(client, kind: str, prompts: list[str], **settings) -> list[list[int]]:
    results = client.generate(model=kind, prompts=prompts, max_new_tokens=NEW_TOKENS, **settings)
    return [list(result.token_ids) for result in results]


def expected_ids(exported, kind: str, prompts: list[str], **settings) -> list[list[int]]:
    checkpoint = exported[kind].checkpoint
    return reference.generate_ids(checkpoint, prompts, max_new_tokens=NEW_TOKENS, do_sample=False, **settings)


def test_the_server_decodes_the_fused_graph(server):
    for kind in KINDS:
        session = server.server.registry.get(kind).pipeline.sessions["model"]
        assert is_fused(session)
        assert server.server.registry.get(kind).pipeline.scheduler is None


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_on_single_prompts(client, exported, kind):
    for prompt in PROMPTS:
        (ids,) = served_ids(client, kind, [prompt])
        assert [ids] == expected_ids(exported, kind, [prompt])
        assert len(set(ids)) > 3  # a decoder repeating one token would prove little


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_rows_equal_their_solo_runs(client, exported, kind):
    batched = served_ids(client, kind, PROMPTS)
    assert batched == [served_ids(client, kind, [prompt])[0] for prompt in PROMPTS]
    assert batched == expected_ids(exported, kind, PROMPTS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "settings",
    [{"num_beams": 3}, {"num_beams": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2}],
    ids=["beams3", "beams2-short-ngram"],
)
def test_beam_search_matches_transformers(client, exported, kind, settings):
    assert served_ids(client, kind, PROMPTS[:1], **settings) == expected_ids(exported, kind, PROMPTS[:1], **settings)
    assert served_ids(client, kind, PROMPTS, **settings) == expected_ids(exported, kind, PROMPTS, **settings)


@pytest.mark.parametrize("kind", KINDS)
def test_repetition_penalty_matches_transformers(client, exported, kind):
    settings = {"repetition_penalty": 1.5}
    assert served_ids(client, kind, PROMPTS, **settings) == expected_ids(exported, kind, PROMPTS, **settings)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_sampling_is_reproducible_and_top_1_is_greedy(client, exported, kind):
    settings = {"do_sample": True, "temperature": 1.3, "top_k": 40, "top_p": 0.9}
    by_seed = [served_ids(client, kind, PROMPTS, seed=seed, **settings) for seed in range(2)]
    assert by_seed == [served_ids(client, kind, PROMPTS, seed=seed, **settings) for seed in range(2)]
    assert by_seed[0] != by_seed[1]  # the seed is used
    # Sampling draws from the logits the greedy path takes its argmax of.
    assert served_ids(client, kind, PROMPTS, do_sample=True, top_k=1, seed=0) == expected_ids(exported, kind, PROMPTS)


def test_cache_on_the_device_path_gives_the_same_ids(client, exported, monkeypatch):
    """The cache in OrtValues bound by address (the CUDA path), here on the CPU: the same ids,
    beams (whose rows are reordered every step) included."""
    monkeypatch.setattr(causal, "FusedGraph", functools.partial(FusedGraph, cache_device="cpu"))
    for settings in ({}, {"num_beams": 3}):
        served = served_ids(client, "llama-causal-lm", PROMPTS, **settings)
        assert served == expected_ids(exported, "llama-causal-lm", PROMPTS, **settings)
