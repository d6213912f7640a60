"""Answer at parity with transformers.pipeline("question-answering") on the same checkpoint."""

from __future__ import annotations

from functools import cache

import grpc
import pytest
from transformers import pipeline

from tests.checkpoints import CHINESE_QA_CONTEXT, CHINESE_QA_QUESTION, CORPUS
from tests.encoder_parity import agreement, assert_score, one_torch_thread  # noqa: F401 (a fixture)
from tests.parity import TRICKY_TEXTS, tokenizer
from tests.test_errors import expect_status

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["bert-question-answering", "roberta-question-answering", "bert-chinese-question-answering"]
QUESTIONS = [text for text in CORPUS if text.endswith("?")]
LONG_CONTEXT = " ".join(CORPUS[:60])  # about 850 tokens: three 384-token windows
PAIRS = [
    (CHINESE_QA_QUESTION, CHINESE_QA_CONTEXT),
    (QUESTIONS[0], LONG_CONTEXT),
    (QUESTIONS[1], " ".join(CORPUS[40:70])),  # two or three windows
    (QUESTIONS[2], "Café au lait in Zürich, naïve but fine. José painted a crème brûlée in São Paulo."),
    ("Où est le café?", "Naïve    questions  deserve   patient answers near the café in Montréal."),
    ("Who launched 🚀?", "🙂🙂🚀 launch day! Rockets 🚀 and smiles 🙂 everywhere at 06:45 UTC."),
    ("谁写了一首诗歌？", "我的朋友写了一首诗歌。那位诗人参观了北京的博物馆。"),
    (QUESTIONS[3], TRICKY_TEXTS[-1]),
    (QUESTIONS[4], "a b"),
]
# For int8 agreement: more pairs, so the measured rate means something.
INT8_PAIRS = PAIRS + [(QUESTIONS[i], " ".join(CORPUS[100 + 4 * i : 104 + 4 * i])) for i in range(5, 36)]
OPTIONS = [
    {},
    {"top_k": 3},
    {"top_k": 4, "handle_impossible_answer": True},
    {"top_k": 2, "max_seq_len": 64, "doc_stride": 16},
    {"top_k": 5, "max_answer_len": 3},
]


@cache
def reference(checkpoint):
    return pipeline("question-answering", model=str(checkpoint), device="cpu")


def expected_answers(checkpoint, question: str, context: str, **options) -> list[dict]:
    answers = reference(checkpoint)(question=question, context=context, **options)
    return answers if isinstance(answers, list) else [answers]


def answer(client, kind: str, pairs, **options):
    return client.answer(
        model=kind, questions=[q for q, _ in pairs], contexts=[c for _, c in pairs], **{"top_k": 1, **options}
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_answers_match_pipeline_fp32(client, exported, kind, options):
    response = answer(client, kind, PAIRS, **options)
    assert len(response) == len(PAIRS)
    for served, (question, context) in zip(response, PAIRS, strict=True):
        expected = expected_answers(exported[kind].checkpoint, question, context, **options)
        assert [(a.answer, a.start, a.end) for a in served] == [(e["answer"], e["start"], e["end"]) for e in expected]
        for got, want in zip(served, expected, strict=True):
            assert_score(got.score, want["score"])
            assert context[got.start : got.end] == got.answer


def test_chinese_seed_example(client, exported):
    kind = "bert-chinese-question-answering"
    served = answer(client, kind, [(CHINESE_QA_QUESTION, CHINESE_QA_CONTEXT)])[0][0]
    expected = expected_answers(exported[kind].checkpoint, CHINESE_QA_QUESTION, CHINESE_QA_CONTEXT)[0]
    assert (served.answer, served.start, served.end) == (expected["answer"], expected["start"], expected["end"])
    # Random weights choose an arbitrary span, but it is made of whole characters of the context.
    assert served.answer and CHINESE_QA_CONTEXT[served.start : served.end] == served.answer


def test_long_context_is_read_in_overlapping_windows(client, exported):
    kind = "bert-question-answering"
    response = answer(client, kind, [(QUESTIONS[0], LONG_CONTEXT)])
    context_tokens = len(tokenizer(exported[kind].checkpoint)(LONG_CONTEXT, add_special_tokens=False).input_ids)
    assert context_tokens > 2 * 384
    # Three windows, overlapping by doc_stride (128), hold more tokens than the context.
    assert response.metadata.batch_size == 3
    assert response.metadata.tokens > context_tokens + 2 * 128


def test_top_k_zero_means_one(client):
    response = answer(client, "bert-question-answering", PAIRS[:3], top_k=0)
    assert [len(answers) for answers in response] == [1, 1, 1]


def test_impossible_answer_is_the_empty_span(client):
    # "a b" has three spans, so with top_k 4 the empty answer (the CLS position) is among them.
    response = answer(
        client, "roberta-question-answering", [(QUESTIONS[4], "a b")], top_k=4, handle_impossible_answer=True
    )
    assert ("", 0, 0) in [(a.answer, a.start, a.end) for a in response[0]]


def test_long_question_is_cut_to_max_question_len(client):
    kind = "bert-question-answering"
    question = " ".join(QUESTIONS[:12])
    context = "The café owner visited the museum."
    tokens = [
        len(e.input_ids) for e in client.tokenize(model=kind, texts=[question, context], add_special_tokens=False)
    ]
    assert tokens[0] > 64
    cut = answer(client, kind, [(question, context)])
    whole = answer(client, kind, [(question, context)], max_question_len=tokens[0])
    assert cut.metadata.tokens == 64 + tokens[1] + 3
    assert whole.metadata.tokens == tokens[0] + tokens[1] + 3


@pytest.mark.parametrize("kind", KINDS)
def test_int8_agrees_on_top1(int8_server, exported, kind):
    with int8_server.client() as client:
        response = answer(client, kind, INT8_PAIRS)
    assert response.metadata.precision == "int8"
    served = [(answers[0].answer, answers[0].start) for answers in response]
    expected = [
        (e["answer"], e["start"]) for e in (expected_answers(exported[kind].checkpoint, q, c)[0] for q, c in INT8_PAIRS)
    ]
    # Measured: the best answer is identical for 40 of 40 pairs with each of the three models.
    assert agreement(served, expected) >= 0.95


@pytest.mark.parametrize(
    ("pairs", "options", "words"),
    [
        ([("", "Some context.")], {}, ["question 0", "empty"]),
        ([("Who?", "x"), ("   ", "Some context.")], {}, ["question 1", "empty"]),
        ([("Who?", "")], {}, ["context 0", "empty"]),
        ([("Who?", "   ")], {}, ["context 0", "no token"]),
        ([(" ".join(QUESTIONS[:8]), "A context.")], {"max_seq_len": 32, "max_question_len": 64}, ["no room"]),
        ([("Who?", LONG_CONTEXT)], {"max_seq_len": 32, "doc_stride": 30}, ["doc_stride 30", "less than"]),
        ([("Who?", "A context.")], {"max_seq_len": 32, "doc_stride": 40}, ["doc_stride 40", "larger"]),
        ([("Who?", "A context.")], {"max_seq_len": 4096}, ["max_seq_len 4096", "maximum"]),
    ],
    ids=[
        "empty-question",
        "blank-question",
        "empty-context",
        "blank-context",
        "no-room-for-context",
        "stride-over-window",
        "stride-over-max-seq-len",
        "max-seq-len-over-model",
    ],
)
def test_bad_input_is_invalid(client, pairs, options, words):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, *words):
        answer(client, "bert-question-answering", pairs, **options)


def test_contexts_must_pair_with_questions(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "one context per question"):
        client.answer(model="bert-question-answering", questions=["a?", "b?"], contexts=["only one"])


def test_empty_batch_is_invalid(client):
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "no questions"):
        client.answer(model="bert-question-answering", questions=[], contexts=[])
