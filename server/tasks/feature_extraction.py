"""Encode: sentence embeddings from a feature-extraction graph, pooled over tokens."""

from __future__ import annotations

import numpy as np
from onnxserve.server.runtime.tokenizer import TokenizeOptions
from onnxserve.server.tasks.base import EncoderPipeline, Prepared, RowOutputs, require_batch
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration

from onnxserve.v1 import common_pb2, inference_pb2, manifest_pb2


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: int) -> np.ndarray:
    """Pools one sequence's token states [tokens, hidden] into one vector."""
    kept = hidden[attention_mask.astype(bool)]
    if pooling == common_pb2.POOLING_CLS:
        return hidden[0]
    if pooling == common_pb2.POOLING_LAST_TOKEN:
        return kept[-1]
    return kept.mean(axis=0)


def model_pooling(manifest: manifest_pb2.Manifest) -> int:
    """The checkpoint's own pooling (sentence-transformers config), else mean."""
    return manifest.pooling or common_pb2.POOLING_MEAN


class FeatureExtractionPipeline(EncoderPipeline[inference_pb2.EncodeRequest]):
    def preprocess(self, request: inference_pb2.EncodeRequest) -> Prepared:
        require_batch(request.texts, "texts")
        truncation = request.truncate if request.HasField("truncate") else True
        return Prepared(self.tokenizer.encode(request.texts, options=TokenizeOptions(truncation=truncation)))

    def postprocess(
        self, request: inference_pb2.EncodeRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.EncodeResponse:
        pooling = request.pooling or model_pooling(self.manifest)
        response = inference_pb2.EncodeResponse()
        for encoding, row in zip(prepared.sequences, outputs, strict=True):
            vector = pool(row["last_hidden_state"], np.asarray(encoding.attention_mask), pooling)
            if request.normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            response.embeddings.add().values.extend(vector.astype(np.float32).tolist())
        return response


REGISTRATION = TaskRegistration(
    name="feature-extraction",
    task=common_pb2.TASK_FEATURE_EXTRACTION,
    pipeline=FeatureExtractionPipeline,
    rpcs=frozenset({"Encode"}),
    kserve_text=KServeText("Encode", "texts"),
    export=ExportSpec("feature-extraction", "AutoModel"),
)
