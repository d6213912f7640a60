"""Vision checkpoints: their transformers image processor (preprocessor_config.json), translated
into the manifest's ImageProcessing, which the server reproduces with Pillow and numpy, and checked
here against the processor itself on sample images, so that a processor the server cannot
reproduce is refused at export instead of served with other numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnxserve.export.errors import ExportError
from onnxserve.server.tasks.images import ImageProcessor
from PIL import Image

from onnxserve.v1 import manifest_pb2

#: How far the server's pixel_values may be from the processor's: both resize with the same Pillow
#: call on the same uint8 pixels, so only float rounding differs.
MAX_PIXEL_DIFF = 1e-4
# ConvNeXt (and ResNet, which uses its processor) resize below this edge to edge / crop_pct, then
# crop to the edge; at or above it they resize to a square (transformers' ConvNextImageProcessor).
_CONVNEXT_CROP_BELOW = 384
# YolosImageProcessor rounds both sides of its resize down to a multiple of this (its mod_size).
_YOLOS_SIZE_MULTIPLE = 16


def load_image_processor(checkpoint: Path) -> Any:
    """The checkpoint's slow (PIL and numpy) image processor, the one the pipeline's reference uses."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    except (OSError, ValueError, ImportError) as error:
        raise ExportError(f"cannot load {checkpoint}'s image processor (preprocessor_config.json): {error}") from error


def image_processing(processor: Any) -> manifest_pb2.ImageProcessing:
    """The processor's steps as the manifest records them; ExportError for one the server cannot
    reproduce (checked on sample images, see check_image_processing)."""
    name = type(processor).__name__
    if not getattr(processor, "do_resize", False):
        raise ExportError(f"{name} does not resize: images of varied sizes could not be batched")
    processing = manifest_pb2.ImageProcessing(processor=name, resample=int(processor.resample))
    _resize(processor, processing)
    if getattr(processor, "do_center_crop", False):
        processing.crop_height, processing.crop_width = processor.crop_size["height"], processor.crop_size["width"]
    if processing.shortest_edge and not processing.crop_height and not processing.longest_edge:
        raise ExportError(f"{name} resizes by the shortest edge without cropping: images would not share one size")
    if getattr(processor, "do_pad", False) and getattr(processor, "pad_size", None):
        raise ExportError(f"{name} pads to a fixed pad_size, which the exported graph has no pixel_mask for")
    if processor.do_rescale:
        processing.rescale_factor = processor.rescale_factor
    if processor.do_normalize:
        processing.image_mean.extend(_per_channel(processor.image_mean))
        processing.image_std.extend(_per_channel(processor.image_std))
    check_image_processing(processor, processing)
    return processing


def _resize(processor: Any, processing: manifest_pb2.ImageProcessing) -> None:
    size, name = processor.size, type(processor).__name__
    if hasattr(processor, "crop_pct") and "shortest_edge" in size:  # ConvNextImageProcessor's rule
        edge = size["shortest_edge"]
        if edge < _CONVNEXT_CROP_BELOW:
            processing.shortest_edge = int(edge / processor.crop_pct)
            processing.crop_height = processing.crop_width = edge
        else:
            processing.height = processing.width = edge
    elif "height" in size and "width" in size:
        processing.height, processing.width = size["height"], size["width"]
    elif "shortest_edge" in size and "longest_edge" in size:  # DETR's and YOLOS's aspect-keeping resize
        processing.shortest_edge, processing.longest_edge = size["shortest_edge"], size["longest_edge"]
        processing.size_multiple = _YOLOS_SIZE_MULTIPLE if name == "YolosImageProcessor" else 0
    elif "shortest_edge" in size:
        processing.shortest_edge = size["shortest_edge"]
    else:
        raise ExportError(f"{name}'s size {size} is not one the server reproduces")


def _per_channel(value: float | list[float]) -> list[float]:
    return [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]


def sample_images() -> list[Image.Image]:
    """RGB images of varied sizes and aspect ratios (tiny, wide, tall, large), for the check here
    and the validation's inputs."""
    rng = np.random.default_rng(15)
    sizes = [(7, 5), (64, 64), (300, 200), (90, 40), (33, 257), (480, 360)]
    images = []
    for width, height in sizes:
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
        noise = rng.normal(0, 40, (height, width, 3))
        images.append(Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)))
    return images


def check_image_processing(processor: Any, processing: manifest_pb2.ImageProcessing) -> None:
    """Refuses the export when the server's pixel_values differ from the processor's."""
    served = ImageProcessor(processing)
    for image in sample_images():
        expected = processor(images=image, return_tensors="np")["pixel_values"][0]
        got = served(image)
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > MAX_PIXEL_DIFF:
            difference = "shape " + str(got.shape) if got.shape != expected.shape else "values"
            raise ExportError(
                f"the server cannot reproduce {type(processor).__name__} (its {difference} differ on a "
                f"{image.width} x {image.height} image): this image processor is not supported"
            )
