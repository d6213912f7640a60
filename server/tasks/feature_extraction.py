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


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, or a packed repeated scalar) in protobuf's wire format."""
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def embeddings_response(vectors: np.ndarray) -> inference_pb2.EncodeResponse:
    """An EncodeResponse with one Embedding per row of `vectors` [texts, hidden]. Each row's packed
    little-endian float32 bytes are its `values` field as it travels, so protobuf's parser copies
    each row in one piece, where `values.extend` converts float by float (about 8x slower per
    vector; docs/performance.md)."""
    field = inference_pb2.EncodeResponse.DESCRIPTOR.fields_by_name["embeddings"].number
    values = inference_pb2.Embedding.DESCRIPTOR.fields_by_name["values"].number
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    response = inference_pb2.EncodeResponse()
    wire = b"".join(_length_delimited(field, _length_delimited(values, row.tobytes())) for row in rows)
    response.MergeFromString(wire)
    return response


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (an all-zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.float32(1e-12))


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
        vectors = np.stack(
            [
                pool(row["last_hidden_state"], np.asarray(encoding.attention_mask), pooling)
                for encoding, row in zip(prepared.sequences, outputs, strict=True)
            ]
        ).astype(np.float32, copy=False)
        return embeddings_response(unit_rows(vectors) if request.normalize else vectors)


REGISTRATION = TaskRegistration(
    name="feature-extraction",
    task=common_pb2.TASK_FEATURE_EXTRACTION,
    pipeline=FeatureExtractionPipeline,
    rpcs=frozenset({"Encode"}),
    kserve_text=KServeText("Encode", "texts"),
    export=ExportSpec("feature-extraction", "AutoModel"),
)
