"""The tiny checkpoints load offline, behave like real ones of their family, and are deterministic."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    pipeline,
)

from tests.checkpoints import CHINESE_QA_CONTEXT, CHINESE_QA_QUESTION, CORPUS, KINDS, NER_LABELS, build_checkpoint

ENCODERS = [kind for kind in KINDS if kind.split("-")[0] in ("bert", "distilbert", "roberta")]
DECODERS = [kind for kind in KINDS if kind not in ENCODERS]
# Long enough that question answering needs more than one 384-token window.
LONG_CONTEXT = " ".join(CORPUS[:60])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build_checkpoint(kind, root / kind) for kind in KINDS}


def test_corpus_covers_the_hard_cases() -> None:
    text = "\n".join(CORPUS)
    assert 300 <= len(CORPUS) <= 1000
    for needle in ("café", "naïve", "Zürich", "São Paulo", "🙂", "🚀", "   ", "1,234.56", CHINESE_QA_QUESTION):
        assert needle in text, needle
    assert any(sentence.startswith(CHINESE_QA_CONTEXT[:46]) for sentence in CORPUS)


def check_text_classification(directory: Path) -> None:
    classify = pipeline("text-classification", model=str(directory), top_k=None)
    config = classify.model.config
    for scores in classify(CORPUS[:3]):
        assert {score["label"] for score in scores} == set(config.id2label.values())
        total = sum(score["score"] for score in scores)
        if config.problem_type == "multi_label_classification":
            assert total != pytest.approx(1.0)  # independent sigmoids, not a softmax
        else:
            assert total == pytest.approx(1.0)


def check_nli(directory: Path) -> None:
    check_text_classification(directory)
    classify = pipeline("zero-shot-classification", model=str(directory))
    result = classify(CORPUS[0], candidate_labels=["travel", "food", "music"])
    assert sorted(result["labels"]) == ["food", "music", "travel"]
    assert sum(result["scores"]) == pytest.approx(1.0)


def check_feature_extraction(directory: Path) -> None:
    extract = pipeline("feature-extraction", model=str(directory))
    features = torch.tensor(extract(CORPUS[0]))
    assert features.shape == (1, len(extract.tokenizer(CORPUS[0]).input_ids), extract.model.config.hidden_size)


def check_token_classification(directory: Path) -> None:
    tag = pipeline("token-classification", model=str(directory), ignore_labels=[])
    text = CORPUS[1]
    entities = tag(text)
    assert len(entities) == len(tag.tokenizer(text).input_ids) - 2  # every token but [CLS] and [SEP]
    for entity in entities:
        assert entity["entity"] in NER_LABELS
        assert entity["word"].removeprefix("##") == text[entity["start"] : entity["end"]]


def check_question_answering(directory: Path) -> None:
    answer = pipeline("question-answering", model=str(directory))
    assert len(answer.tokenizer(LONG_CONTEXT).input_ids) > 384
    for question, context in [(CORPUS[250], LONG_CONTEXT), (CHINESE_QA_QUESTION, CHINESE_QA_CONTEXT)]:
        result = answer(question=question, context=context)
        assert result["answer"] and context[result["start"] : result["end"]] == result["answer"]


def check_fill_mask(directory: Path) -> None:
    fill = pipeline("fill-mask", model=str(directory))
    results = fill(f"The cat {fill.tokenizer.mask_token} the museum in Zürich.")
    assert len(results) == 5
    assert all(result["sequence"].startswith("The cat") for result in results)


def check_multiple_choice(directory: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForMultipleChoice.from_pretrained(directory)
    choices = CORPUS[:4]
    batch = tokenizer([CORPUS[250]] * len(choices), choices, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**{name: tensor.unsqueeze(0) for name, tensor in batch.items()}).logits
    assert logits.shape == (1, len(choices))


def check_text_generation(directory: Path) -> None:
    generate = pipeline("text-generation", model=str(directory))
    (result,) = generate(CORPUS[0], max_new_tokens=8, do_sample=False)
    assert result["generated_text"].startswith(CORPUS[0])
    assert len(result["generated_text"]) > len(CORPUS[0])


def check_text2text_generation(directory: Path) -> None:
    generate = pipeline("text2text-generation", model=str(directory))
    (result,) = generate(CORPUS[0], max_new_tokens=8, do_sample=False)
    assert result["generated_text"].strip()


CHECKS: dict[str, Callable[[Path], None]] = {
    "sequence-classification": check_text_classification,
    "sequence-classification-multilabel": check_text_classification,
    "nli": check_nli,
    "feature-extraction": check_feature_extraction,
    "token-classification": check_token_classification,
    "question-answering": check_question_answering,
    "fill-mask": check_fill_mask,
    "multiple-choice": check_multiple_choice,
    "causal-lm": check_text_generation,
    "seq2seq": check_text2text_generation,
}


def task_of(kind: str) -> str:
    return next(task for task in CHECKS if kind.endswith(f"-{task}") and not kind.endswith(f"-{task}-multilabel"))


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_runs(kind: str, built: dict[str, Path]) -> None:
    CHECKS[task_of(kind)](built[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_is_reloaded(kind: str, built: dict[str, Path]) -> None:
    config = AutoConfig.from_pretrained(built[kind])
    model_class = getattr(transformers, config.architectures[0])
    _, loading = model_class.from_pretrained(built[kind], output_loading_info=True)
    assert not any(loading.values()), loading


@pytest.mark.parametrize("kind", KINDS)
def test_vocabulary_covers_the_corpus(kind: str, built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[kind])
    assert tokenizer.is_fast
    for sentence in CORPUS:
        assert tokenizer.unk_token_id not in tokenizer(sentence).input_ids, sentence


@pytest.mark.parametrize("kind", ENCODERS)
def test_offsets_point_at_the_tokens(kind: str, built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[kind])
    for text in CORPUS:
        encoding = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        special = encoding.special_tokens_mask
        spans = [span for span, is_special in zip(encoding.offset_mapping, special, strict=True) if not is_special]
        covered = {index for start, end in spans for index in range(start, end)}
        assert {index for index, char in enumerate(text) if not char.isspace()} <= covered, text
        assert [start for start, _ in spans] == sorted(start for start, _ in spans)
        for token_id, (start, end) in zip(encoding.input_ids, encoding.offset_mapping, strict=True):
            piece = tokenizer.decode([token_id]).removeprefix("##").strip()
            # A byte-level token may hold part of a character's bytes: it decodes to U+FFFD.
            if "\ufffd" not in piece and start < end:
                assert piece == text[start:end].strip(), (text, piece)


@pytest.mark.parametrize("kind", [kind for kind in KINDS if not kind.startswith(("bert", "distilbert"))])
def test_decoding_gives_the_text_back(kind: str, built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[kind])
    # Sentencepiece-like tokenizers split on whitespace, so runs of it come back as one space.
    collapses_whitespace = kind in ("t5-seq2seq", "marian-seq2seq")
    for text in CORPUS:
        expected = " ".join(text.split()) if collapses_whitespace else text
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == expected


def test_chinese_vocabulary_is_character_level(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["bert-chinese-question-answering"])
    assert tokenizer.tokenize(CHINESE_QA_CONTEXT) == list(CHINESE_QA_CONTEXT)


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_output_varies(kind: str, built: dict[str, Path]) -> None:
    model_class = AutoModelForSeq2SeqLM if kind.endswith("seq2seq") else AutoModelForCausalLM
    model = model_class.from_pretrained(built[kind])
    tokenizer = AutoTokenizer.from_pretrained(built[kind])
    outputs = []
    for prompt in CORPUS[:2]:
        output = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=20, do_sample=False)[0]
        outputs.append(output[-20:].tolist())
        assert len(outputs[-1]) == 20 and len(set(outputs[-1])) >= 5, outputs[-1]
    assert outputs[0] != outputs[1]  # the output depends on the input


def test_generation_configs_match_their_families(built: dict[str, Path]) -> None:
    bart = pipeline("text2text-generation", model=str(built["bart-seq2seq"])).model.generation_config
    assert (bart.decoder_start_token_id, bart.forced_bos_token_id, bart.forced_eos_token_id) == (2, 0, 2)
    marian = pipeline("text2text-generation", model=str(built["marian-seq2seq"]))
    assert marian.model.generation_config.decoder_start_token_id == marian.tokenizer.pad_token_id
    t5 = pipeline("text2text-generation", model=str(built["t5-seq2seq"])).model.generation_config
    assert (t5.decoder_start_token_id, t5.eos_token_id, t5.pad_token_id) == (0, 1, 0)
    llama = AutoTokenizer.from_pretrained(built["llama-causal-lm"])
    assert llama("hi").input_ids[0] == llama.bos_token_id and llama.pad_token_id is not None


def test_another_process_builds_the_same_files(built: dict[str, Path], tmp_path: Path) -> None:
    # Another process, because tokenizer trainers can depend on per-process hash seeds.
    script = (
        "import sys, pathlib, tests.checkpoints as c\n"
        "for kind in c.KINDS: c.build_checkpoint(kind, pathlib.Path(sys.argv[1]) / kind)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=Path(__file__).parents[1])
    for kind in KINDS:
        names = sorted(path.name for path in built[kind].iterdir())
        assert names == sorted(path.name for path in (tmp_path / kind).iterdir()), kind
        for name in names:
            assert (built[kind] / name).read_bytes() == (tmp_path / kind / name).read_bytes(), (kind, name)
