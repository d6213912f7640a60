"""Answer: extractive question answering as the question-answering pipeline does it. A long
context is split into overlapping windows (only the context is truncated), each window scores
every span, and the best spans across windows are mapped to character offsets in the context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.tokenizer import TokenizeOptions
from onnxserve.server.tasks.base import EncoderPipeline, ModelResources, Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration
from tokenizers import Encoding

from onnxserve.v1 import common_pb2, inference_pb2

# The pipeline's defaults, which the contract documents for the zero values.
DEFAULT_TOP_K = 1
DEFAULT_MAX_ANSWER_LEN = 15
DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_MAX_DOC_STRIDE = 128
DEFAULT_MAX_QUESTION_LEN = 64
# Logit given to tokens that cannot be in an answer, as the pipeline does, so they get no probability.
EXCLUDED_LOGIT = -10000.0
# The pipeline's "no answer yet" null score: large, so any window's CLS score replaces it.
NO_NULL_SCORE = 1000000.0


@dataclass(frozen=True)
class Windowing:
    """How question and context are cut into model inputs."""

    max_seq_len: int
    doc_stride: int
    max_question_len: int


@dataclass
class Span:
    """A candidate answer; `score` grows when other windows find the same text."""

    answer: str
    score: float
    start: int
    end: int


class QuestionAnsweringPipeline(EncoderPipeline[inference_pb2.AnswerRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        bare = self.tokenizer.tokenizer
        self.cls_token_id = bare.token_to_id(self.manifest.special_tokens.cls_token or "")
        processor = bare.post_processor
        self.pair_special_tokens = processor.num_special_tokens_to_add(True) if processor else 0

    def windowing(self, request: inference_pb2.AnswerRequest) -> Windowing:
        """The request's window settings, zeros replaced by the pipeline's defaults."""
        max_seq_len = request.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, self.tokenizer.max_length)
        if max_seq_len > self.tokenizer.max_length:
            raise InvalidArgument(
                f"max_seq_len {max_seq_len} is over the model's maximum of {self.tokenizer.max_length} tokens"
            )
        doc_stride = request.doc_stride or min(max_seq_len // 2, DEFAULT_MAX_DOC_STRIDE)
        if doc_stride > max_seq_len:
            raise InvalidArgument(f"doc_stride {doc_stride} is larger than max_seq_len {max_seq_len}")
        return Windowing(max_seq_len, doc_stride, request.max_question_len or DEFAULT_MAX_QUESTION_LEN)

    def preprocess(self, request: inference_pb2.AnswerRequest) -> Prepared:
        require_batch(request.questions, "questions")
        if len(request.contexts) != len(request.questions):
            raise InvalidArgument(
                f"contexts has {len(request.contexts)} entries but questions has {len(request.questions)}: "
                "give one context per question"
            )
        windowing = self.windowing(request)
        questions = self.checked_questions(request.questions, request.contexts, windowing)
        options = TokenizeOptions(
            max_length=windowing.max_seq_len, stride=windowing.doc_stride, truncate_only_second=True
        )
        windows: list[Encoding] = []
        counts: list[int] = []
        for encoding in self.tokenizer.encode(questions, request.contexts, options):
            # Truncating only the context with a stride yields the overlapping windows as overflow.
            windows.extend([encoding, *encoding.overflowing])
            counts.append(1 + len(encoding.overflowing))
        return Prepared(windows, {"window_counts": counts})

    def checked_questions(self, questions: Sequence[str], contexts: Sequence[str], windowing: Windowing) -> list[str]:
        """The questions cut to max_question_len tokens, once each pair is known to leave room in a
        window for its context; the tokenizer would otherwise fail (or panic) on such a pair."""
        bare = self.tokenizer.tokenizer
        question_encodings = bare.encode_batch(list(questions), add_special_tokens=False)
        context_encodings = bare.encode_batch(list(contexts), add_special_tokens=False)
        checked = []
        for index, (question, encoding, context_encoding) in enumerate(
            zip(questions, question_encodings, context_encodings, strict=True)
        ):
            if not question.strip():
                raise InvalidArgument(f"question {index} is empty")
            context_tokens = len(context_encoding.ids)
            if not context_tokens:
                raise InvalidArgument(f"context {index} is empty: it holds no token that could be an answer")
            kept = min(len(encoding.ids), windowing.max_question_len)
            room = windowing.max_seq_len - self.pair_special_tokens - kept
            if room < 1:
                raise InvalidArgument(
                    f"question {index} takes {kept} tokens, which leaves no room for its context in a "
                    f"{windowing.max_seq_len}-token window: raise max_seq_len or lower max_question_len"
                )
            if context_tokens > room and windowing.doc_stride >= room:
                raise InvalidArgument(
                    f"doc_stride {windowing.doc_stride} must be less than the {room} context tokens a window "
                    f"holds beside question {index}"
                )
            checked.append(question[: encoding.offsets[kept - 1][1]] if kept < len(encoding.ids) else question)
        return checked

    def postprocess(
        self, request: inference_pb2.AnswerRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.AnswerResponse:
        top_k = request.top_k or DEFAULT_TOP_K
        max_answer_len = request.max_answer_len or DEFAULT_MAX_ANSWER_LEN
        response = inference_pb2.AnswerResponse()
        first = 0
        for context, count in zip(request.contexts, prepared.context["window_counts"], strict=True):
            windows = list(zip(prepared.sequences[first : first + count], outputs[first : first + count], strict=True))
            first += count
            spans = self.best_spans(context, windows, top_k, max_answer_len, request.handle_impossible_answer)
            response.results.add().answers.extend(
                inference_pb2.Answer(answer=s.answer, score=s.score, start=s.start, end=s.end) for s in spans
            )
        return response

    def best_spans(
        self,
        context: str,
        windows: Sequence[tuple[Encoding, RowOutputs]],
        top_k: int,
        max_answer_len: int,
        handle_impossible_answer: bool,
    ) -> list[Span]:
        """The pipeline's postprocess over one question's windows."""
        spans: list[Span] = []
        null_score = NO_NULL_SCORE
        for encoding, row in windows:
            answerable = self.answerable(encoding)
            start, end = span_probabilities(row["start_logits"], row["end_logits"], answerable)
            null_score = min(null_score, float(start[0] * end[0]))
            # Position 0 (CLS) is the empty answer, scored only through the null score.
            start[0] = end[0] = 0.0
            for first, last, score in top_spans(start, end, answerable, top_k, max_answer_len):
                char_start, char_end = char_span(encoding, first, last)
                add_span(spans, Span(context[char_start:char_end], score, char_start, char_end))
        if handle_impossible_answer:
            spans.append(Span("", null_score, 0, 0))
        return sorted(spans, key=lambda span: span.score, reverse=True)[:top_k]

    def answerable(self, encoding: Encoding) -> np.ndarray:
        """Tokens an answer may start or end on: the context's and CLS (the empty answer). The
        pipeline's own check also lets position 0 through, whatever token it holds."""
        ids = np.asarray(encoding.ids)
        answerable = np.asarray([s == 1 for s in encoding.sequence_ids]) | (ids == self.cls_token_id)
        answerable[0] = True
        return answerable


def span_probabilities(
    start_logits: np.ndarray, end_logits: np.ndarray, answerable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Start and end probabilities over the window, zero outside the answerable tokens."""
    return (
        softmax(np.where(answerable, start_logits, EXCLUDED_LOGIT)),
        softmax(np.where(answerable, end_logits, EXCLUDED_LOGIT)),
    )


def top_spans(
    start: np.ndarray, end: np.ndarray, answerable: np.ndarray, top_k: int, max_answer_len: int
) -> list[tuple[int, int, float]]:
    """The window's best (start, end, score) spans, chosen as the pipeline's decode_spans does, with
    its extra candidates (top_k * 2 + 10) because candidates can merge once widened to words."""
    wanted = top_k * 2 + 10
    # Span score = P(start) * P(end), for end >= start and at most max_answer_len tokens.
    scores = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    flat = scores.flatten()
    if len(flat) < wanted:
        order = np.argsort(-flat)
    else:
        best = np.argpartition(-flat, wanted)[:wanted]
        order = best[np.argsort(-flat[best])]
    firsts, lasts = np.unravel_index(order, scores.shape)
    return [
        (int(s), int(e), float(scores[s, e]))
        for s, e in zip(firsts, lasts, strict=True)
        if answerable[s] and answerable[e]
    ]


def char_span(encoding: Encoding, first: int, last: int) -> tuple[int, int]:
    """The characters of the context a token span covers, widened to whole words (the pipeline's
    align_to_words); a span touching a token outside any word keeps the tokens' own offsets."""
    first_word, last_word = encoding.token_to_word(first), encoding.token_to_word(last)
    if first_word is None or last_word is None:
        return encoding.offsets[first][0], encoding.offsets[last][1]
    return encoding.word_to_chars(first_word, 1)[0], encoding.word_to_chars(last_word, 1)[1]


def add_span(spans: list[Span], span: Span) -> None:
    """Adds a candidate; the same text (ignoring case) found again adds its score to the first."""
    for known in spans:
        if known.answer.lower() == span.answer.lower():
            known.score += span.score
            return
    spans.append(span)


REGISTRATION = TaskRegistration(
    name="question-answering",
    task=common_pb2.TASK_QUESTION_ANSWERING,
    pipeline=QuestionAnsweringPipeline,
    rpcs=frozenset({"Answer"}),
    kserve_text=KServeText("Answer", "questions"),
    export=ExportSpec("question-answering", "AutoModelForQuestionAnswering"),
)
