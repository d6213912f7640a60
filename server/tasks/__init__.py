"""Task modules, one per pipeline. Serving a new head means adding its module here."""

from __future__ import annotations

from onnxserve.server.tasks.base import Pipeline
from onnxserve.server.tasks.feature_extraction import FeatureExtractionPipeline
from onnxserve.server.tasks.fill_mask import FillMaskPipeline
from onnxserve.server.tasks.generation import GenerationPipeline
from onnxserve.server.tasks.multiple_choice import MultipleChoicePipeline
from onnxserve.server.tasks.question_answering import QuestionAnsweringPipeline
from onnxserve.server.tasks.text_classification import TextClassificationPipeline
from onnxserve.server.tasks.token_classification import TokenClassificationPipeline

from onnxserve.v1 import common_pb2

#: The Inference RPCs each task serves, as the contract (inference.proto) defines them.
TASK_RPCS: dict[int, frozenset[str]] = {
    common_pb2.TASK_FEATURE_EXTRACTION: frozenset({"Encode"}),
    common_pb2.TASK_TEXT_CLASSIFICATION: frozenset({"Classify"}),
    common_pb2.TASK_TOKEN_CLASSIFICATION: frozenset({"TagTokens"}),
    common_pb2.TASK_QUESTION_ANSWERING: frozenset({"Answer"}),
    common_pb2.TASK_FILL_MASK: frozenset({"FillMask"}),
    common_pb2.TASK_MULTIPLE_CHOICE: frozenset({"Classify"}),
    common_pb2.TASK_TEXT_GENERATION: frozenset({"Generate", "GenerateStream"}),
    common_pb2.TASK_TEXT2TEXT_GENERATION: frozenset({"Generate", "GenerateStream"}),
}

#: The pipelines this release implements, by task.
PIPELINES: dict[int, type[Pipeline]] = {
    common_pb2.TASK_FEATURE_EXTRACTION: FeatureExtractionPipeline,
    common_pb2.TASK_TEXT_CLASSIFICATION: TextClassificationPipeline,
    common_pb2.TASK_TOKEN_CLASSIFICATION: TokenClassificationPipeline,
    common_pb2.TASK_QUESTION_ANSWERING: QuestionAnsweringPipeline,
    common_pb2.TASK_FILL_MASK: FillMaskPipeline,
    common_pb2.TASK_MULTIPLE_CHOICE: MultipleChoicePipeline,
    common_pb2.TASK_TEXT_GENERATION: GenerationPipeline,
    common_pb2.TASK_TEXT2TEXT_GENERATION: GenerationPipeline,
}
