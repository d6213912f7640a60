"""Classify: sequence classification of texts or text pairs (softmax, or sigmoid for
multi-label models), as the text-classification pipeline does; with candidate_labels, zero-shot
classification of NLI models, as the zero-shot-classification pipeline does."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.tokenizer import TextTokenizer, TokenizeOptions
from onnxserve.server.tasks.base import (
    EncoderPipeline,
    Prepared,
    RowOutputs,
    require_batch,
    sigmoid,
    softmax,
)
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration

from onnxserve.v1 import common_pb2, inference_pb2, manifest_pb2

DEFAULT_HYPOTHESIS_TEMPLATE = "This example is {}."


def ranked_labels(scores: np.ndarray, labels: list[str], top_k: int) -> list[inference_pb2.LabelScore]:
    """Labels by descending score (stable for ties, like the pipeline), at most top_k (0: all)."""
    order = np.argsort(-scores, kind="stable")
    if top_k:
        order = order[:top_k]
    return [inference_pb2.LabelScore(label=labels[i], score=float(scores[i])) for i in order]


def scores(manifest: manifest_pb2.Manifest, logits: np.ndarray) -> np.ndarray:
    """The pipelines' function_to_apply (text and image classification): sigmoid for multi-label or
    single-logit heads, else softmax."""
    if manifest.multi_label or logits.shape[-1] == 1:
        return sigmoid(logits)
    return softmax(logits)


def truncation(request: inference_pb2.ClassifyRequest) -> bool:
    return request.truncate if request.HasField("truncate") else True


def encode_candidates(
    tokenizer: TextTokenizer, request: inference_pb2.ClassifyRequest, seconds: Sequence[str]
) -> Prepared:
    """One pair per text and candidate, text-major: (text, seconds[j]) for every candidate j."""
    if request.text_pairs:
        raise InvalidArgument("text_pairs cannot be combined with candidate_labels: send the texts alone")
    texts = [text for text in request.texts for _ in seconds]
    pairs = list(seconds) * len(request.texts)
    return Prepared(tokenizer.encode(texts, pairs, TokenizeOptions(truncation=truncation(request))))


def candidate_results(
    request: inference_pb2.ClassifyRequest,
    outputs: list[RowOutputs],
    score: Callable[[np.ndarray], np.ndarray],
) -> inference_pb2.ClassifyResponse:
    """Scores each text's candidates from its rows' logits (stacked, one row per candidate) and
    ranks them; the text is returned as the result's sequence, as the pipelines do."""
    candidates = list(request.candidate_labels)
    response = inference_pb2.ClassifyResponse()
    for index, text in enumerate(request.texts):
        rows = outputs[index * len(candidates) : (index + 1) * len(candidates)]
        scores = score(np.stack([row["logits"] for row in rows]))
        response.results.add(sequence=text).labels.extend(ranked_labels(scores, candidates, request.top_k))
    return response


def nli_label_ids(labels: Sequence[str]) -> tuple[int, int]:
    """(entailment, contradiction) ids. Entailment is the first label starting with "entail", as
    the pipeline finds it; contradiction the first starting with "contra", else the pipeline's
    guess: the last label when entailment is the first, otherwise the first."""
    lowered = [label.lower() for label in labels]
    entailment = next((i for i, label in enumerate(lowered) if label.startswith("entail")), None)
    if entailment is None:
        raise InvalidArgument(
            f"zero-shot classification needs an NLI model with an entailment label; this model's labels are "
            f"{', '.join(labels) or 'unnamed'}"
        )
    guess = len(labels) - 1 if entailment == 0 else 0
    contradiction = next((i for i, label in enumerate(lowered) if label.startswith("contra")), guess)
    return entailment, contradiction


def hypotheses(template: str, candidate_labels: Sequence[str]) -> list[str]:
    """The hypothesis for each label; a template that the label does not change is refused."""
    try:
        made = [template.format(label) for label in candidate_labels]
    except (IndexError, KeyError, ValueError) as error:
        raise InvalidArgument(f"hypothesis_template {template!r} cannot be formatted: {error}") from error
    if made[0] == template:
        raise InvalidArgument(f"hypothesis_template {template!r} has no {{}} where the label goes")
    return made


class TextClassificationPipeline(EncoderPipeline[inference_pb2.ClassifyRequest]):
    def preprocess(self, request: inference_pb2.ClassifyRequest) -> Prepared:
        require_batch(request.texts, "texts")
        if request.candidate_labels:
            nli_label_ids(self.manifest.labels)
            template = request.hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
            return encode_candidates(self.tokenizer, request, hypotheses(template, request.candidate_labels))
        encodings = self.tokenizer.encode(
            request.texts, request.text_pairs, TokenizeOptions(truncation=truncation(request))
        )
        return Prepared(encodings)

    def zero_shot_scores(self, request: inference_pb2.ClassifyRequest) -> Callable[[np.ndarray], np.ndarray]:
        """From [candidates, NLI labels] logits: with multi_label (or one candidate), each label's
        entailment against contradiction; otherwise entailment compared across the candidates."""
        entailment, contradiction = nli_label_ids(self.manifest.labels)
        if request.multi_label or len(request.candidate_labels) == 1:
            return lambda logits: softmax(logits[:, [contradiction, entailment]])[:, 1]
        return lambda logits: softmax(logits[:, entailment])

    def postprocess(
        self, request: inference_pb2.ClassifyRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyResponse:
        if request.candidate_labels:
            return candidate_results(request, outputs, self.zero_shot_scores(request))
        labels = list(self.manifest.labels)
        response = inference_pb2.ClassifyResponse()
        for row in outputs:
            ranked = ranked_labels(scores(self.manifest, row["logits"]), labels, request.top_k)
            response.results.add().labels.extend(ranked)
        return response


REGISTRATION = TaskRegistration(
    name="text-classification",
    task=common_pb2.TASK_TEXT_CLASSIFICATION,
    pipeline=TextClassificationPipeline,
    rpcs=frozenset({"Classify"}),
    kserve_text=KServeText("Classify", "texts"),
    export=ExportSpec("text-classification", "AutoModelForSequenceClassification"),
)
