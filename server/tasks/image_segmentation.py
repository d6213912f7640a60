"""SegmentImage: semantic segmentation (Segformer, DPT, MobileViT) as the image-segmentation pipeline
does it: the image processor's pixel_values, the model's logits per class at a fraction of the
input's size, upsampled to the original image bilinearly (torch's interpolate with
align_corners=False, as post_process_semantic_segmentation calls it), the best class per pixel, and
one segment per class present, in class order, with no score. Each mask is sent as the pipeline's
PIL image (a mode L PNG, 255 on the segment) and bit-packed.

Instance and panoptic segmentation need heads whose post-processing is not built here (DETR's
panoptic head, MaskFormer): docs/vision.md says what was tried."""

from __future__ import annotations

import io

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import Prepared, RowOutputs, require_batch
from onnxserve.server.tasks.images import ImagePipeline
from onnxserve.server.tasks.object_detection import probability_threshold
from onnxserve.server.tasks.registration import ExportSpec, TaskRegistration
from PIL import Image

from onnxserve.enums import short_name
from onnxserve.v1 import common_pb2, inference_pb2

#: Output rows upsampled at a time: bounds the memory of the upsampled logits (classes x rows x
#: width float32s) whatever the image's size.
UPSAMPLED_ROWS = 64
THRESHOLDS = ("threshold", "mask_threshold", "overlap_mask_area_threshold")
SERVED_SUBTASKS = (inference_pb2.SEGMENTATION_SUBTASK_UNSPECIFIED, inference_pb2.SEGMENTATION_SUBTASK_SEMANTIC)


class SemanticSegmentationPipeline(ImagePipeline[inference_pb2.SegmentImageRequest]):
    def preprocess(self, request: inference_pb2.SegmentImageRequest) -> Prepared:
        require_batch(request.images, "images")
        if request.subtask not in SERVED_SUBTASKS:
            subtask = short_name(inference_pb2.SegmentationSubtask, request.subtask)
            raise InvalidArgument(f"model {self.name!r} segments images semantically: it has no {subtask} segmentation")
        for name in THRESHOLDS:
            if request.HasField(name):
                probability_threshold(getattr(request, name), name)
        return Prepared(self.pixel_values(request.images))

    def postprocess(
        self, request: inference_pb2.SegmentImageRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.SegmentImageResponse:
        labels = list(self.manifest.labels)
        response = inference_pb2.SegmentImageResponse()
        for image, row in zip(prepared.sequences, outputs, strict=True):
            classes = pixel_classes(row["logits"], *image.size)
            segments = response.results.add().segments
            for label in np.unique(classes):
                segments.append(segment(labels[label], classes == label))
        return response


def pixel_classes(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The best class of each pixel of a width x height image, from logits [classes, rows,
    columns] upsampled bilinearly to it, a block of rows at a time."""
    rows, columns = _source_pixels(logits.shape[1], height), _source_pixels(logits.shape[2], width)
    classes = np.empty((height, width), dtype=np.int64)
    for start in range(0, height, UPSAMPLED_ROWS):
        block = slice(start, start + UPSAMPLED_ROWS)
        low, high, weight = (part[block] for part in rows)
        upsampled_rows = logits[:, low] * (1 - weight)[:, np.newaxis] + logits[:, high] * weight[:, np.newaxis]
        low, high, weight = columns
        upsampled = upsampled_rows[:, :, low] * (1 - weight) + upsampled_rows[:, :, high] * weight
        classes[block] = upsampled.argmax(axis=0)
    return classes


def _source_pixels(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target pixel: the two source pixels it lies between and the second one's weight, in
    float32 as torch computes them for align_corners=False (half-pixel centers, clamped at 0)."""
    scale = np.float32(source / target)
    position = np.maximum((np.arange(target, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(position.astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, position - low.astype(np.float32)


def segment(label: str, mask: np.ndarray, score: float | None = None) -> inference_pb2.Segment:
    """A segment with its mask (booleans, rows x columns) as a mode L PNG and bit-packed."""
    png = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(png, "PNG")
    packed = inference_pb2.PackedMask(width=mask.shape[1], height=mask.shape[0], bits=np.packbits(mask).tobytes())
    return inference_pb2.Segment(label=label, score=score, mask=png.getvalue(), packed_mask=packed)


REGISTRATION = TaskRegistration(
    name="image-segmentation",
    task=common_pb2.TASK_IMAGE_SEGMENTATION,
    pipeline=SemanticSegmentationPipeline,
    rpcs=frozenset({"SegmentImage"}),
    export=ExportSpec("semantic-segmentation", "AutoModelForSemanticSegmentation"),
    inputs="images",
)
