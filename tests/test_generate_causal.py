"""Generate on decoder-only models at parity with transformers' generate(): greedy and beam search
token ids on single prompts and left-padded batches, plus sampling's own guarantees."""

from __future__ import annotations

import pytest
from onnxserve.server.tasks.generation import causal
from onnxserve.server.tasks.generation.cache import DeviceCache, empty_past

from tests import generation_reference as reference
from tests.generation_reference import PROMPTS

KINDS = ["gpt2-causal-lm", "llama-causal-lm"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(export):
    return {kind: export(kind, precisions=("fp32",)) for kind in KINDS}


@pytest.fixture(scope="module")
def client(exported, start_server):
    with start_server(exported, precision="fp32").client() as client:
        yield client


def assert_parity(client, exported, kind: str, prompts: list[str], **settings) -> list:
    served = client.generate(model=kind, prompts=prompts, max_new_tokens=NEW_TOKENS, **settings)
    expected = reference.generate_ids(
        exported[kind].checkpoint, prompts, max_new_tokens=NEW_TOKENS, do_sample=False, **settings
    )
    assert [result.token_ids for result in served] == expected
    return list(served)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_on_single_prompts(client, exported, kind):
    for prompt in PROMPTS:
        (result,) = assert_parity(client, exported, kind, [prompt])
        # A random decoder that repeats one token would make the comparison prove little.
        assert len(set(result.token_ids)) > 3


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_on_a_left_padded_batch(client, exported, kind):
    assert_parity(client, exported, kind, PROMPTS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 3},
        {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True},
        {"num_beams": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2},
    ],
    ids=["beams3", "beams4-long-early", "beams2-short-ngram"],
)
def test_beam_search_matches_transformers(client, exported, kind, settings):
    assert_parity(client, exported, kind, PROMPTS[:1], **settings)
    assert_parity(client, exported, kind, PROMPTS, **settings)


@pytest.mark.parametrize("kind", KINDS)
def test_repetition_penalty_and_no_repeat_ngram_match_transformers(client, exported, kind):
    assert_parity(client, exported, kind, PROMPTS, repetition_penalty=1.5)
    results = assert_parity(client, exported, kind, PROMPTS, no_repeat_ngram_size=2)
    for result in results:
        pairs = list(zip(result.token_ids, result.token_ids[1:], strict=False))
        assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize("kind", KINDS)
def test_results_carry_text_counts_and_finish_reason(client, exported, kind):
    checkpoint = exported[kind].checkpoint
    served = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS)
    for result in served:
        assert result.generated_tokens == len(result.token_ids)
        assert result.generated_text == reference.decode(checkpoint, result.token_ids)
        ended = result.token_ids[-1] in reference.eos_ids(checkpoint, seq2seq=False)
        assert result.finish_reason == ("eos" if ended else "length")
    full = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, return_full_text=True)
    assert [r.generated_text for r in full] == [p + r.generated_text for p, r in zip(PROMPTS, served, strict=True)]
    assert served.metadata.tokens == sum(len(reference.tokenizer(checkpoint)(p).input_ids) for p in PROMPTS)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_with_a_seed_is_reproducible(client, kind):
    def sample(seed: int) -> list[list[int]]:
        response = client.generate(
            model=kind,
            prompts=PROMPTS,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            top_p=0.9,
            temperature=1.3,
            seed=seed,
        )
        return [result.token_ids for result in response]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_1_sampling_equals_greedy(client, kind):
    greedy = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS)
    sampled = client.generate(
        model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, temperature=0.7, seed=3
    )
    assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]


@pytest.mark.parametrize("kind", KINDS)
def test_a_sequence_that_stops_early_leaves_the_others_going(client, kind):
    free = client.generate(model=kind, prompts=PROMPTS[:2], max_new_tokens=NEW_TOKENS)
    # A stop string taken from the first output, a few tokens in, and absent from the second.
    text = free[0].generated_text
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if text[i : i + 2].strip() and text[i : i + 2] not in free[1].generated_text
    )
    stopped = client.generate(model=kind, prompts=PROMPTS[:2], max_new_tokens=NEW_TOKENS, stop=[stop])
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].generated_text == text[: text.index(stop)]
    assert stopped[0].generated_tokens < free[0].generated_tokens
    assert stopped[0].token_ids == free[0].token_ids[: stopped[0].generated_tokens]
    assert stopped[1].token_ids == free[1].token_ids
    assert stopped[1].finish_reason == free[1].finish_reason


@pytest.mark.parametrize("kind", KINDS)
def test_the_device_cache_path_gives_the_same_tokens(client, kind, monkeypatch):
    """The I/O-binding cache that CUDA uses, run on the CPU: same tokens as the numpy cache."""
    host = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, num_beams=2)
    monkeypatch.setattr(causal, "new_cache", lambda session, rows: DeviceCache(empty_past(session, rows), "cpu"))
    bound = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert [r.token_ids for r in bound] == [r.token_ids for r in host]
