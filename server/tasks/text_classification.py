"""Classify: sequence classification of texts or text pairs (softmax, or sigmoid for
multi-label models), as the text-classification pipeline does."""

from __future__ import annotations

import numpy as np
from onnxserve.server.errors import Unimplemented
from onnxserve.server.tasks.base import (
    EncoderPipeline,
    Prepared,
    RowOutputs,
    require_batch,
    sigmoid,
    softmax,
)
from onnxserve.server.tokenization import TokenizeOptions

from onnxserve.v1 import inference_pb2


def ranked_labels(scores: np.ndarray, labels: list[str], top_k: int) -> list[inference_pb2.LabelScore]:
    """Labels by descending score (stable for ties, like the pipeline), at most top_k (0: all)."""
    order = np.argsort(-scores, kind="stable")
    if top_k:
        order = order[:top_k]
    return [inference_pb2.LabelScore(label=labels[i], score=float(scores[i])) for i in order]


class TextClassificationPipeline(EncoderPipeline[inference_pb2.ClassifyRequest]):
    rpcs = frozenset({"Classify"})

    def preprocess(self, request: inference_pb2.ClassifyRequest) -> Prepared:
        require_batch(request.texts, "texts")
        if request.candidate_labels:
            raise Unimplemented("zero-shot classification with candidate_labels is not served yet")
        truncation = request.truncate if request.HasField("truncate") else True
        encodings = self.tokenizer.encode(
            request.texts, request.text_pairs, TokenizeOptions(truncation=truncation)
        )
        return Prepared(encodings)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        # The pipeline's function_to_apply: sigmoid for multi-label or single-logit heads.
        if self.manifest.multi_label or logits.shape[-1] == 1:
            return sigmoid(logits)
        return softmax(logits)

    def postprocess(
        self, request: inference_pb2.ClassifyRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyResponse:
        labels = list(self.manifest.labels)
        response = inference_pb2.ClassifyResponse()
        for row in outputs:
            ranked = ranked_labels(self.scores(row["logits"]), labels, request.top_k)
            response.results.add().labels.extend(ranked)
        return response
