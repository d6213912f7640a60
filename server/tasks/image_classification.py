"""ClassifyImage: image classification (ViT, ConvNeXt, ResNet, ...) as the image-classification
pipeline does it: the image processor's pixel_values, the model's logits, then softmax (or sigmoid
for multi-label and single-logit heads) and the top_k labels."""

from __future__ import annotations

from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import Prepared, RowOutputs, require_batch
from onnxserve.server.tasks.images import ImagePipeline
from onnxserve.server.tasks.registration import ExportSpec, KServeImage, TaskRegistration
from onnxserve.server.tasks.text_classification import ranked_labels, scores

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_TOP_K = 5  # the pipeline's


class ImageClassificationPipeline(ImagePipeline[inference_pb2.ClassifyImageRequest]):
    def preprocess(self, request: inference_pb2.ClassifyImageRequest) -> Prepared:
        require_batch(request.images, "images")
        if request.candidate_labels:
            raise InvalidArgument(
                f"model {self.name!r} is an image-classification model with its own labels; candidate_labels "
                "need a zero-shot (CLIP-style) model"
            )
        return Prepared(self.pixel_values(request.images))

    def postprocess(
        self, request: inference_pb2.ClassifyImageRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyImageResponse:
        labels = list(self.manifest.labels)
        top_k = request.top_k or DEFAULT_TOP_K
        response = inference_pb2.ClassifyImageResponse()
        for row in outputs:
            response.results.add().labels.extend(ranked_labels(scores(self.manifest, row["logits"]), labels, top_k))
        return response


REGISTRATION = TaskRegistration(
    name="image-classification",
    task=common_pb2.TASK_IMAGE_CLASSIFICATION,
    pipeline=ImageClassificationPipeline,
    rpcs=frozenset({"ClassifyImage"}),
    kserve_image=KServeImage("ClassifyImage"),
    export=ExportSpec("image-classification", "AutoModelForImageClassification"),
    inputs="images",
)
