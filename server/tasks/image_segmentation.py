"""SegmentImage: image segmentation as the image-segmentation pipeline does it, after the image
processor's pixel_values, for the two kinds of head optimum exports:

- semantic heads (Segformer, DPT, MobileViT): logits per class at a fraction of the input's size,
  upsampled to the original image bilinearly (torch's interpolate with align_corners=False, as
  post_process_semantic_segmentation calls it), the best class per pixel, and one segment per class
  present, in class order, with no score;
- DETR's panoptic head (DetrForSegmentation): per query, logits over the labels and "no object" and
  a mask; its processor's post_process_panoptic_segmentation (the pipeline's default) and
  post_process_instance_segmentation, which are the same computation as the pipeline calls them
  (it fuses no label), and post_process_semantic_segmentation (each class's probability times each
  query's mask, summed over the queries).

Each mask is sent as the pipeline's PIL image (a mode L PNG, 255 on the segment) and bit-packed."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import ModelResources, Prepared, RowOutputs, require_batch, sigmoid, softmax
from onnxserve.server.tasks.images import ImagePipeline
from onnxserve.server.tasks.object_detection import probability_threshold
from onnxserve.server.tasks.registration import ExportSpec, KServeImage, TaskRegistration
from PIL import Image

from onnxserve.enums import short_name
from onnxserve.v1 import common_pb2, inference_pb2

Subtask = inference_pb2.SegmentationSubtask
#: Upsampled values held at a time (64 MiB of float32s): the rows of a block are as many as fit,
#: classes (or queries) x rows x width, so that memory stays bounded whatever the image's size.
UPSAMPLED_VALUES = 1 << 24
#: The pipeline's defaults for threshold, mask_threshold and overlap_mask_area_threshold.
DEFAULT_THRESHOLDS = {"threshold": 0.9, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.5}
# What each kind of head answers; the first is the one the pipeline picks when none is asked.
_SEMANTIC = (inference_pb2.SEGMENTATION_SUBTASK_SEMANTIC,)
_QUERIES = (
    inference_pb2.SEGMENTATION_SUBTASK_PANOPTIC, inference_pb2.SEGMENTATION_SUBTASK_INSTANCE,
    inference_pb2.SEGMENTATION_SUBTASK_SEMANTIC,
)  # fmt: skip


class ImageSegmentationPipeline(ImagePipeline[inference_pb2.SegmentImageRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        # A graph with pred_masks is DETR's panoptic head; the others give per-class logits.
        self.subtasks = _QUERIES if "pred_masks" in self.session.output_names else _SEMANTIC

    def preprocess(self, request: inference_pb2.SegmentImageRequest) -> Prepared:
        require_batch(request.images, "images")
        subtask = request.subtask or self.subtasks[0]
        if subtask not in self.subtasks:
            served = ", ".join(short_name(Subtask, s) for s in self.subtasks)
            raise InvalidArgument(
                f"model {self.name!r} has no {short_name(Subtask, subtask)} segmentation: it serves {served}"
            )
        thresholds = {}
        for name, default in DEFAULT_THRESHOLDS.items():
            given = request.HasField(name)
            thresholds[name] = probability_threshold(getattr(request, name), name) if given else default
        return Prepared(self.pixel_values(request.images), {"subtask": subtask, **thresholds})

    def postprocess(
        self, request: inference_pb2.SegmentImageRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.SegmentImageResponse:
        labels, options = list(self.manifest.labels), prepared.context
        response = inference_pb2.SegmentImageResponse()
        for image, row in zip(prepared.sequences, outputs, strict=True):
            segments = response.results.add().segments
            if options["subtask"] == inference_pb2.SEGMENTATION_SUBTASK_SEMANTIC:
                classes = pixel_classes(class_logits(row), *image.size)
                segments.extend(segment(labels[label], classes == label) for label in np.unique(classes))
            else:
                segments.extend(query_segments(row, image.size, labels, **options))
        return response


def class_logits(row: RowOutputs) -> np.ndarray:
    """Per class, the map whose best class per pixel is the semantic segmentation: a semantic
    head's logits, or for DETR each class's probability (without "no object") times each query's
    mask probability, summed over the queries."""
    if "pred_masks" not in row:
        return row["logits"]
    classes = softmax(row["logits"].astype(np.float32))[:, :-1]
    return np.einsum("qc,qhw->chw", classes, sigmoid(row["pred_masks"].astype(np.float32)))


def pixel_classes(logits: np.ndarray, width: int, height: int) -> np.ndarray:
    """The best class of each pixel of a width x height image, from logits [classes, rows,
    columns] upsampled bilinearly to it."""
    classes = np.empty((height, width), dtype=np.int32)
    for block, upsampled in upsampled_blocks(logits, width, height):
        classes[block] = upsampled.argmax(axis=-1)
    return classes


def query_segments(
    row: RowOutputs, size: tuple[int, int], labels: list[str], subtask: int, threshold: float,
    mask_threshold: float, overlap_mask_area_threshold: float,
) -> list[inference_pb2.Segment]:  # fmt: skip
    """DETR's panoptic (and, as the pipeline calls it, instance) segmentation: the queries whose
    best class is a label scoring above `threshold`; their masks upsampled to the image and weighed
    by their scores; each pixel to the query whose weighed mask is highest there; a query's
    segment kept where it holds more than `overlap_mask_area_threshold` of its own area (its
    weighed mask at or above `mask_threshold`). Scores are rounded to 6 decimals, as transformers'
    compute_segments does."""
    probabilities = softmax(row["logits"].astype(np.float32))
    classes, scores = probabilities.argmax(-1), probabilities.max(-1)
    kept = (classes != probabilities.shape[-1] - 1) & (scores > threshold)
    if not kept.any():
        return []
    classes, scores = classes[kept], scores[kept]
    masks = sigmoid(row["pred_masks"][kept].astype(np.float32))
    owners = np.empty(size[::-1], dtype=np.int32)
    areas = np.zeros(len(scores), dtype=np.int64)
    for block, upsampled in upsampled_blocks(masks, *size):
        upsampled *= scores
        owners[block] = upsampled.argmax(axis=-1)
        areas += (upsampled >= mask_threshold).sum(axis=(0, 1))
    segments = []
    for query, (label, score, area) in enumerate(zip(classes, scores, areas, strict=True)):
        mask = owners == query
        held = int(mask.sum())
        if held > 0 and area > 0 and held / area > overlap_mask_area_threshold:
            segments.append(segment(labels[label], mask, round(float(score), 6)))
    return segments


def upsampled_blocks(values: np.ndarray, width: int, height: int) -> Iterator[tuple[slice, np.ndarray]]:
    """`values` [channels, rows, columns] upsampled bilinearly to height x width, a block of rows
    at a time: (the block's rows, [block rows, width, channels]). Channels last, so that each
    gather copies whole runs of values and the best channel of a pixel is a contiguous argmax;
    columns first, on the few source rows, then rows block by block, as torch sums them."""
    rows, columns = _source_pixels(values.shape[1], height), _source_pixels(values.shape[2], width)
    widened = _blend(np.ascontiguousarray(values.transpose(1, 2, 0)), *columns, axis=1)  # [rows, width, ch.]
    block_rows = max(1, UPSAMPLED_VALUES // (values.shape[0] * width))
    for start in range(0, height, block_rows):
        block = slice(start, start + block_rows)
        yield block, _blend(widened, *(part[block] for part in rows), axis=0)


def _blend(values: np.ndarray, low: np.ndarray, high: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """values at `low` x (1 - weight) + values at `high` x weight along `axis` (the first or the
    second of three), in place: temporaries of this size cost more than the arithmetic."""
    weight = weight.reshape(-1, *[1] * (2 - axis))
    blended = np.take(values, low, axis=axis)
    blended *= 1 - weight
    upper = np.take(values, high, axis=axis)
    upper *= weight
    blended += upper
    return blended


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
    pipeline=ImageSegmentationPipeline,
    rpcs=frozenset({"SegmentImage"}),
    kserve_image=KServeImage("SegmentImage"),
    # optimum's image-segmentation task loads either kind, and so does the reference (in this order).
    export=ExportSpec("image-segmentation", ("AutoModelForSemanticSegmentation", "AutoModelForImageSegmentation")),
    inputs="images",
)
