"""DetectObjects: object detection (DETR, YOLOS, Table Transformer) as the object-detection pipeline
does it: each image at its own size (the processor keeps the aspect ratio), the model's logits over
the labels and "no object" and its boxes (center, width, height, relative to the image), then
post_process_object_detection in numpy: softmax, the best label other than "no object", boxes to
corners scaled to the original image, the scores above the threshold, the boxes truncated to
whole pixels."""

from __future__ import annotations

import math

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.images import ImagePipeline
from onnxserve.server.tasks.registration import ExportSpec, KServeImage, TaskRegistration

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_THRESHOLD = 0.5  # the pipeline's


class ObjectDetectionPipeline(ImagePipeline[inference_pb2.DetectObjectsRequest]):
    def preprocess(self, request: inference_pb2.DetectObjectsRequest) -> Prepared:
        require_batch(request.images, "images")
        if request.HasField("threshold"):
            probability_threshold(request.threshold, "threshold")
        return Prepared(self.pixel_values(request.images))

    def postprocess(
        self, request: inference_pb2.DetectObjectsRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.DetectObjectsResponse:
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_THRESHOLD
        labels = list(self.manifest.labels)
        response = inference_pb2.DetectObjectsResponse()
        for image, row in zip(prepared.sequences, outputs, strict=True):
            found = response.results.add()
            scores, classes, boxes = detections(row["logits"], row["pred_boxes"], image.size)
            for score, label, box in zip(scores, classes, boxes, strict=True):
                if score > threshold:
                    xmin, ymin, xmax, ymax = box.tolist()
                    found.objects.add(score=float(score), label=labels[label], box=inference_pb2.BoundingBox(
                        xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax,
                    ))  # fmt: skip
        return response


def detections(logits: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Per query: its score, its label and its box in whole pixels of an image of `size` (width,
    height), in float32 as transformers computes them: the softmax is taken over every class with
    "no object" (the last one), which is then left out of the choice."""
    probabilities = softmax(logits.astype(np.float32))
    labels = probabilities[:, :-1].argmax(-1)
    scores = probabilities[np.arange(len(labels)), labels]
    scale = np.array([size[0], size[1], size[0], size[1]], dtype=np.float32)
    pixels = (corners(boxes.astype(np.float32)) * scale).astype(np.int32)  # truncated toward zero, as torch's .int()
    return scores, labels, pixels


def corners(boxes: np.ndarray) -> np.ndarray:
    """Boxes [n, 4] as (center x, center y, width, height) to (xmin, ymin, xmax, ymax), as
    transformers' center_to_corners_format."""
    return np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)


def probability_threshold(value: float, name: str) -> float:
    """`value` if it is a number (any, as the pipeline compares scores against it); INVALID_ARGUMENT
    naming the field for NaN, which no score passes or fails."""
    if math.isnan(value):
        raise InvalidArgument(f"{name} is NaN: send a number (scores above it are kept)")
    return value


REGISTRATION = TaskRegistration(
    name="object-detection",
    task=common_pb2.TASK_OBJECT_DETECTION,
    pipeline=ObjectDetectionPipeline,
    rpcs=frozenset({"DetectObjects"}),
    kserve_image=KServeImage("DetectObjects"),
    export=ExportSpec("object-detection", "AutoModelForObjectDetection"),
    inputs="images",
)
