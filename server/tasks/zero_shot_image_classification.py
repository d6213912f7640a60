"""ClassifyImage with candidate_labels on CLIP and SigLIP models: zero-shot image classification as
the zero-shot-image-classification pipeline does it. Each label goes into the hypothesis template,
the hypotheses are tokenized and padded together, the images become pixel_values, and the graph's
logits_per_image (image-text similarities times the logit scale) are turned into a softmax over the
labels, per image. SigLIP, as its pipeline: hypotheses padded to 64 tokens (what it was trained
on), and each label scored on its own with a sigmoid (SigLIP's logits carry a bias for that).

A request runs as one ONNX Runtime run of its own, off the batcher: its images are scored against
its own labels, so rows of different requests could not share a run."""

from __future__ import annotations

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.errors import DeadlineExceeded, InvalidArgument
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import TokenizeOptions, batch_arrays
from onnxserve.server.tasks.base import ModelResources, Pipeline, require_batch, sigmoid, softmax
from onnxserve.server.tasks.images import decode, image_processor, probe_images
from onnxserve.server.tasks.registration import ExportSpec, KServeImage, TaskRegistration
from onnxserve.server.tasks.text_classification import hypotheses, ranked_labels

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."  # the pipeline's
SIGLIP_TOKENIZING = TokenizeOptions(padding="max_length", max_length=64, truncation=True)  # the pipeline's


class ZeroShotImageClassificationPipeline(Pipeline[inference_pb2.ClassifyImageRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.session = resources.sessions["model"]
        self.processor = image_processor(resources)
        self.siglip = "siglip" in self.manifest.model_type  # siglip, siglip2: as the pipeline tells them
        self.tokenizing = SIGLIP_TOKENIZING if self.siglip else TokenizeOptions()

    async def run(
        self, rpc: str, request: inference_pb2.ClassifyImageRequest, timings: Timings, time_left: float | None
    ) -> Message:
        if time_left is not None and time_left <= 0:
            raise DeadlineExceeded(f"the deadline passed before the request reached model {self.name!r}")
        return await self._blocking(lambda: self.classify(request, timings))

    async def warm_up(self) -> None:
        hypothesis = self.tokenizer.encode([DEFAULT_HYPOTHESIS_TEMPLATE.format("cat")], options=self.tokenizing)
        pixels = self.processor(probe_images()[0])[np.newaxis]
        feeds = {**batch_arrays(hypothesis, self.tokenizer.pad_token_id), "pixel_values": pixels}
        await self._blocking(lambda: self.session.run(feeds))

    def classify(
        self, request: inference_pb2.ClassifyImageRequest, timings: Timings
    ) -> inference_pb2.ClassifyImageResponse:
        """preprocess (tokenize the hypotheses, decode and process the images) -> forward -> a
        softmax over the labels per image, ranked."""
        feeds = timings.timed("tokenization", lambda: self.preprocess(request, timings))
        logits = timings.timed("inference", lambda: self.session.run(feeds)["logits_per_image"])
        timings.batch_size = len(request.images)
        return timings.timed("postprocess", lambda: self.postprocess(request, logits))

    def preprocess(self, request: inference_pb2.ClassifyImageRequest, timings: Timings) -> dict[str, np.ndarray]:
        require_batch(request.images, "images")
        if not request.candidate_labels:
            raise InvalidArgument(
                f"model {self.name!r} classifies images zero-shot: send the candidate_labels to score"
            )
        template = request.hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
        encodings = self.tokenizer.encode(hypotheses(template, request.candidate_labels), options=self.tokenizing)
        timings.tokens = sum(len(encoding.ids) for encoding in encodings)
        pixels = np.stack([self.processor(decode(image, index)) for index, image in enumerate(request.images)])
        return {**batch_arrays(encodings, self.tokenizer.pad_token_id), "pixel_values": pixels}

    def postprocess(
        self, request: inference_pb2.ClassifyImageRequest, logits: np.ndarray
    ) -> inference_pb2.ClassifyImageResponse:
        labels = list(request.candidate_labels)
        response = inference_pb2.ClassifyImageResponse()
        for row in logits:
            scores = sigmoid(row) if self.siglip else softmax(row)
            response.results.add().labels.extend(ranked_labels(scores, labels, request.top_k))
        return response


REGISTRATION = TaskRegistration(
    name="zero-shot-image-classification",
    task=common_pb2.TASK_ZERO_SHOT_IMAGE_CLASSIFICATION,
    pipeline=ZeroShotImageClassificationPipeline,
    rpcs=frozenset({"ClassifyImage"}),
    kserve_image=KServeImage("ClassifyImage"),
    export=ExportSpec("zero-shot-image-classification", "AutoModelForZeroShotImageClassification"),
    inputs="text and images",
)
