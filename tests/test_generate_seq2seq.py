"""Generate on encoder-decoders (T5, BART, Marian) at parity with transformers' generate(): the
encoder once, the decoder with its cache, greedy and beam search, and generation_config.json's
defaults (decoder start, forced BOS and EOS, banned tokens)."""

from __future__ import annotations

import pytest
from onnxserve.server.tasks.generation import seq2seq
from onnxserve.server.tasks.generation.cache import DeviceCache, empty_past

from tests import generation_reference as reference
from tests.generation_reference import PROMPTS

KINDS = ["t5-seq2seq", "bart-seq2seq", "marian-seq2seq"]
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
        exported[kind].checkpoint, prompts, seq2seq=True, max_new_tokens=NEW_TOKENS, do_sample=False, **settings
    )
    assert [result.token_ids for result in served] == expected
    return list(served)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_on_single_prompts(client, exported, kind):
    for prompt in PROMPTS:
        (result,) = assert_parity(client, exported, kind, [prompt])
        assert len(set(result.token_ids)) > 3  # outputs vary, so the comparison means something


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_on_a_padded_batch(client, exported, kind):
    assert_parity(client, exported, kind, PROMPTS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 4},
        {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True},
        {"num_beams": 3, "length_penalty": 0.6, "no_repeat_ngram_size": 2},
    ],
    ids=["beams4", "beams4-long-early", "beams3-short-ngram"],
)
def test_beam_search_matches_transformers(client, exported, kind, settings):
    assert_parity(client, exported, kind, PROMPTS[:1], **settings)
    assert_parity(client, exported, kind, PROMPTS, **settings)


def test_bart_forces_bos_first_and_eos_last(client, exported):
    checkpoint = exported["bart-seq2seq"].checkpoint
    tokenizer = reference.tokenizer(checkpoint)
    for result in client.generate(model="bart-seq2seq", prompts=PROMPTS, max_new_tokens=NEW_TOKENS):
        assert result.token_ids[0] == tokenizer.bos_token_id
        assert result.token_ids[-1] == tokenizer.eos_token_id
        assert result.finish_reason == "eos"


def test_marian_never_generates_its_padding(client, exported):
    pad = reference.tokenizer(exported["marian-seq2seq"].checkpoint).pad_token_id
    for settings in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 1}):
        for result in client.generate(model="marian-seq2seq", prompts=PROMPTS, max_new_tokens=NEW_TOKENS, **settings):
            assert pad not in result.token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_text_is_the_decoded_tokens(client, exported, kind):
    checkpoint = exported[kind].checkpoint
    for result in client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS):
        assert result.generated_text == reference.decode(checkpoint, result.token_ids)
        assert result.generated_tokens == len(result.token_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_reproducible_and_top_k_1_is_greedy(client, kind):
    def sample(**settings) -> list[list[int]]:
        response = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, **settings)
        return [result.token_ids for result in response]

    assert sample(seed=11, top_k=20) == sample(seed=11, top_k=20)
    greedy = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert sample(seed=5, top_k=1) == [result.token_ids for result in greedy]


@pytest.mark.parametrize("kind", KINDS)
def test_the_device_cache_path_gives_the_same_tokens(client, kind, monkeypatch):
    """The I/O-binding cache that CUDA uses, run on the CPU: same tokens as the numpy cache."""
    host = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, num_beams=2)
    monkeypatch.setattr(seq2seq, "new_cache", lambda session, rows: DeviceCache(empty_past(session, rows), "cpu"))
    bound = client.generate(model=kind, prompts=PROMPTS, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert [r.token_ids for r in bound] == [r.token_ids for r in host]
