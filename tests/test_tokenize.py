"""Tokenize and Detokenize at parity with the Hugging Face tokenizer of the checkpoint."""

from __future__ import annotations

import pytest

from tests.checkpoints import CORPUS
from tests.parity import TRICKY_TEXTS, tokenizer

KINDS = ["bert-feature-extraction", "roberta-feature-extraction", "bert-chinese-question-answering"]
TEXTS = TRICKY_TEXTS + CORPUS[30:36]
PAIRS = ["what about it?", "你好", "São Paulo 🙂", "x", "second   segment", "y", "z", *CORPUS[40:46]]


@pytest.fixture(scope="module")
def exported(export):
    return {kind: export(kind, precisions=("fp32",)) for kind in KINDS}


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported)


def assert_encodings_match(served, expected, index: int, *, pairs: bool) -> None:
    assert served.input_ids == expected["input_ids"][index]
    assert served.attention_mask == expected["attention_mask"][index]
    assert served.special_tokens_mask == expected["special_tokens_mask"][index]
    assert served.offsets == [tuple(o) for o in expected["offset_mapping"][index]]
    if pairs and "token_type_ids" in expected:
        assert served.token_type_ids == expected["token_type_ids"][index]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_pairs", [False, True])
def test_tokenize_matches_hf_tokenizer(server, exported, kind, with_pairs):
    pairs = PAIRS[: len(TEXTS)] if with_pairs else None
    with server.client() as client:
        response = client.tokenize(model=kind, texts=TEXTS, text_pairs=pairs)
    expected = tokenizer(exported[kind].checkpoint)(
        TEXTS, pairs, truncation=True, return_offsets_mapping=True, return_special_tokens_mask=True,
        return_token_type_ids=True,
    )
    for index, served in enumerate(response):
        assert_encodings_match(served, expected, index, pairs=with_pairs)
        assert served.tokens == tokenizer(exported[kind].checkpoint).convert_ids_to_tokens(served.input_ids)


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_tokenize_padding_and_truncation_match(server, exported, padding):
    kind = KINDS[0]
    with server.client() as client:
        response = client.tokenize(model=kind, texts=TEXTS, max_length=12, padding=padding)
    expected = tokenizer(exported[kind].checkpoint)(
        TEXTS, truncation=True, max_length=12, padding=padding, return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    lengths = {len(e.input_ids) for e in response}
    assert lengths == ({12} if padding == "max_length" else {max(len(ids) for ids in expected["input_ids"])})
    for index, served in enumerate(response):
        assert_encodings_match(served, expected, index, pairs=False)


def test_tokenize_without_special_tokens(server, exported):
    kind = KINDS[0]
    with server.client() as client:
        response = client.tokenize(model=kind, texts=TEXTS, add_special_tokens=False)
    expected = tokenizer(exported[kind].checkpoint)(TEXTS, add_special_tokens=False)
    assert [e.input_ids for e in response] == expected["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_detokenize_matches_hf_decode(server, exported, kind):
    hf = tokenizer(exported[kind].checkpoint)
    sequences = [hf(text)["input_ids"] for text in TEXTS]
    with server.client() as client:
        skipped = client.detokenize(model=kind, sequences=sequences)
        kept = client.detokenize(model=kind, sequences=sequences, skip_special_tokens=False)
    assert list(skipped) == hf.batch_decode(sequences, skip_special_tokens=True)
    assert list(kept) == hf.batch_decode(sequences, skip_special_tokens=False)


def test_detokenize_cleans_up_spaces_when_the_tokenizer_does(export, checkpoint, start_server, tmp_path_factory):
    """BERT tokenizers (bert-base-uncased...) ask for clean_up_tokenization_spaces: "france ." -> "france."."""
    import json
    import shutil

    source = tmp_path_factory.mktemp("cleanup") / "bert"
    shutil.copytree(checkpoint("bert-feature-extraction"), source)
    config_path = source / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "clean_up_tokenization_spaces": True}))
    server = start_server({"cleanup": export("bert-cleanup", precisions=("fp32",), source=source)})
    hf = tokenizer(source)
    texts = ["the river , the city . is it ? yes ! don ' t"]
    sequences = [hf(text)["input_ids"] for text in texts]
    with server.client() as client:
        served = list(client.detokenize(model="cleanup", sequences=sequences))
    assert served == hf.batch_decode(sequences, skip_special_tokens=True)
    assert " ," not in served[0] and " ." not in served[0]
