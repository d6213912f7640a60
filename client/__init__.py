"""Python clients for onnxserve, built on the stubs generated from protos/."""

from onnxserve.client.client import AsyncClient, Client
from onnxserve.client.results import (
    Answer,
    Classification,
    Encoding,
    Entity,
    GeneratedSequence,
    LabelScore,
    MaskCandidate,
    Metadata,
    ModelInfo,
    Response,
    StreamChunk,
)

__all__ = [
    "Answer",
    "AsyncClient",
    "Classification",
    "Client",
    "Encoding",
    "Entity",
    "GeneratedSequence",
    "LabelScore",
    "MaskCandidate",
    "Metadata",
    "ModelInfo",
    "Response",
    "StreamChunk",
]
