"""What every vision head shares: decoding an `Image` message as the transformers pipelines load
images (Pillow, EXIF orientation, RGB), the image processor of the manifest's ImageProcessing in
numpy (resize, center crop, rescale, normalize), and the batched pipeline that runs the images'
pixel_values through the model's batcher. No torch, no transformers."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.batching import batchmate_drift, drift_within_limit
from onnxserve.server.tasks.base import BatchedPipeline, ModelResources, Request, RowOutputs
from PIL import Image, ImageOps, UnidentifiedImageError

from onnxserve.v1 import inference_pb2, manifest_pb2

#: The encoded formats the contract names; Pillow is asked to try no other decoder.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
#: Images larger than this are refused before they are decoded: a small file may declare billions
#: of pixels (a decompression bomb). Pillow's own warning threshold (about 0.25 GB as RGB).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
RAW_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def decode(image: inference_pb2.Image, index: int) -> Image.Image:
    """The request's image `index` as an RGB Pillow image, the way transformers' load_image makes
    it (EXIF orientation applied, then converted to RGB: alpha dropped, grayscale and palettes
    expanded); INVALID_ARGUMENT naming the image and the problem for anything else."""
    source = image.WhichOneof("source")
    if source == "raw":
        return _from_raw(image.raw, index)
    if source is None or not image.data:
        raise InvalidArgument(f"image {index} is empty: set its data (an encoded file) or raw (pixels)")
    try:
        opened = Image.open(io.BytesIO(image.data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image {index} ({len(image.data)} bytes) is not a {', '.join(FORMATS)} file, or is corrupt"
        ) from None
    except Image.DecompressionBombError as error:  # Pillow's own check, at twice MAX_PIXELS
        raise InvalidArgument(f"image {index}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # a known header, then a broken file (truncated JPEG)
        raise InvalidArgument(f"image {index} ({len(image.data)} bytes) cannot be read: {error}") from None
    _check_size(opened.width, opened.height, index)
    try:
        return ImageOps.exif_transpose(opened).convert("RGB")
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ... by format
        raise InvalidArgument(f"image {index} ({opened.format}) cannot be decoded: {error}") from error


def _from_raw(raw: inference_pb2.RawImage, index: int) -> Image.Image:
    mode = RAW_MODES.get(raw.channels)
    if mode is None:
        raise InvalidArgument(f"image {index}: raw images have 1, 3 or 4 channels, not {raw.channels}")
    _check_size(raw.width, raw.height, index)
    expected = raw.width * raw.height * raw.channels
    if len(raw.pixels) != expected:
        raise InvalidArgument(
            f"image {index}: raw pixels hold {len(raw.pixels)} bytes, but width x height x channels = "
            f"{raw.width} x {raw.height} x {raw.channels} = {expected}"
        )
    shape = (raw.height, raw.width) if raw.channels == 1 else (raw.height, raw.width, raw.channels)
    pixels = np.frombuffer(raw.pixels, dtype=np.uint8).reshape(shape)
    return Image.fromarray(pixels, mode).convert("RGB")


def _check_size(width: int, height: int, index: int) -> None:
    if width == 0 or height == 0:
        raise InvalidArgument(f"image {index} has no pixels ({width} x {height})")
    if width * height > MAX_PIXELS:
        raise InvalidArgument(f"image {index} has {width} x {height} pixels, over the limit of {MAX_PIXELS}")


class ImageProcessor:
    """The manifest's ImageProcessing: a decoded RGB image to pixel_values, [3, height, width]
    float32, with the numbers transformers' image processor computes (the same Pillow resize on
    uint8 pixels, then rescaling in float64 and normalizing in float32, as it does)."""

    def __init__(self, processing: manifest_pb2.ImageProcessing) -> None:
        self.processing = processing
        self.mean = np.array(processing.image_mean, dtype=np.float32)
        self.std = np.array(processing.image_std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> np.ndarray:
        p = self.processing
        size = self.resized_size(image.width, image.height)
        if 0 in size:  # the processor itself fails on it, with PIL's words
            raise InvalidArgument(
                f"an image of {image.width} x {image.height} pixels is too narrow for {p.processor}, which would "
                f"resize it to {size[0]} x {size[1]}"
            )
        pixels = np.asarray(image.resize(size, Image.Resampling(p.resample)))
        if p.crop_height and p.crop_width:
            top, left = (pixels.shape[0] - p.crop_height) // 2, (pixels.shape[1] - p.crop_width) // 2
            pixels = pixels[top : top + p.crop_height, left : left + p.crop_width]
        values = (pixels.astype(np.float64) * p.rescale_factor if p.rescale_factor else pixels).astype(np.float32)
        if self.mean.size:
            values = (values - self.mean) / self.std
        return np.ascontiguousarray(values.transpose(2, 0, 1))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize: exact, or the shorter side at shortest_edge with the
        longer one rounded down, as transformers' get_resize_output_image_size computes it (DETR's
        and YOLOS's rule where a longest_edge bounds the longer side)."""
        p = self.processing
        if p.height and p.width:
            return p.width, p.height
        if p.longest_edge:
            return _bounded_size(width, height, p.shortest_edge, p.longest_edge, p.size_multiple)
        short, long = sorted((width, height))
        longer = int(p.shortest_edge * long / short)
        return (p.shortest_edge, longer) if width <= height else (longer, p.shortest_edge)


def _bounded_size(width: int, height: int, shortest: int, longest: int, multiple: int) -> tuple[int, int]:
    """transformers' get_size_with_aspect_ratio, DETR's (multiple 0) and YOLOS's (which rounds both
    sides down to a multiple of 16, and tests the portrait case first), kept branch for branch:
    where the longer side would pass `longest`, the shorter one is scaled from the unrounded size."""
    size, raw = shortest, None
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > longest:
        raw = longest * short / long
        size = round(raw)
    scale = raw if raw is not None else size
    unchanged = (height <= width and height == size) or (width <= height and width == size)
    if width < height and (multiple or not unchanged):
        new_width, new_height = size, int(scale * height / width)
    elif unchanged:
        new_width, new_height = width, height
    else:
        new_width, new_height = int(scale * width / height), size
    if multiple:
        new_width, new_height = new_width - new_width % multiple, new_height - new_height % multiple
    return new_width, new_height


def image_processor(resources: ModelResources) -> ImageProcessor:
    """The model's image processor, from its manifest."""
    if not resources.manifest.HasField("image_processing"):
        raise ModelLoadError(f"model {resources.name!r} has no image_processing in its manifest: export it again")
    return ImageProcessor(resources.manifest.image_processing)


#: Pixels that count as one token of the batcher's budget (max_batch_tokens): a 16 x 16 patch, as
#: ViT's, so that the budget bounds a run's pixels as it bounds a text run's tokens.
PIXELS_PER_TOKEN = 16 * 16


def budget_tokens(values: np.ndarray) -> int:
    """What one image's pixel_values [channels, height, width] count in the batcher's budget."""
    height, width = values.shape[-2:]
    return max(1, height * width // PIXELS_PER_TOKEN)


@dataclass(frozen=True)
class PixelValues:
    """One preprocessed image as the batcher carries it, with its decoded size (width, height), which
    detection and segmentation map their answers back to. Its length is its pixels in the budget's
    tokens, so that max_batch_tokens bounds a run's pixels (a DETR run of 800 x 1066 images holds
    four); nothing is padded: images of one size run together (ImagePipeline.forward)."""

    values: np.ndarray
    size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return budget_tokens(self.values)


def probe_images() -> list[Image.Image]:
    """Synthetic images of varied sizes and content, for warm-up and the batchmate-drift check."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    noise = rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)
    flat = np.full((33, 33, 3), 200, dtype=np.uint8)
    return [Image.fromarray(pixels) for pixels in (gradient, noise, flat)]


class ImagePipeline(BatchedPipeline[Request]):
    """A pipeline over one vision graph that takes pixel_values: images are decoded and processed
    on the tokenizing executor, and their pixel_values batched like token sequences."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.processor = image_processor(resources)

    def pixel_values(self, images: Sequence[inference_pb2.Image]) -> list[PixelValues]:
        decoded = (decode(image, index) for index, image in enumerate(images))
        return [PixelValues(self.processor(image), image.size) for image in decoded]

    def forward(self, inputs: Sequence[PixelValues]) -> list[RowOutputs]:
        """One ONNX Runtime run per pixel_values shape: processors that keep the aspect ratio (DETR's)
        give each image its own size, and the pipelines run each image alone, unpadded, so images
        of one size share a run and no image is padded to another's."""
        rows: list[RowOutputs] = [{} for _ in inputs]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(inputs):
            by_shape.setdefault(image.values.shape, []).append(index)
        for indices in by_shape.values():
            outputs = self.session.run(self.feeds([inputs[index] for index in indices]))
            for row, index in enumerate(indices):
                rows[index] = {name: value[row] for name, value in outputs.items()}
        return rows

    def feeds(self, inputs: Sequence[PixelValues]) -> dict[str, np.ndarray]:
        """One run's inputs; heads whose graph takes more per image (a patch mask) add theirs."""
        return {"pixel_values": np.stack([image.values for image in inputs])}

    def warm_up_inputs(self) -> list[PixelValues]:
        return [PixelValues(self.processor(probe_images()[0]))]

    def merges_safely(self) -> bool:
        """As text encoders (runtime/batching.py merges_safely), measured on probe_images."""
        drift = batchmate_drift(self.forward, [PixelValues(self.processor(image)) for image in probe_images()])
        return drift_within_limit(self.name, drift, self.precision, "images")
