"""ReconstructImage: masked image modeling with SimMIM heads (ViTForMaskedImageModeling), as the
model's forward computes it, since no pipeline exists for it. Each image's pixel_values and its
patch mask (bool_masked_pos: the given patch indices, a mask image's bright patches, or a seeded
random draw) run through the graph the exporter builds with the mask as an input
(export/hand_built.py); the answer is the `reconstruction`, as float32 bytes and as a PNG in pixels,
and the loss PyTorch's forward computes for the image alone: the L1 distance between pixel_values
and the reconstruction over the masked patches' pixels, divided by their count (plus 1e-5) and the
channels."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import ModelResources, Prepared, RowOutputs, require_batch
from onnxserve.server.tasks.images import ImagePipeline, PixelValues, budget_tokens, decode
from onnxserve.server.tasks.registration import SINGLE_GRAPH, ExportSpec, HandBuilt, KServeImage, TaskRegistration
from PIL import Image

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_MASK_RATIO = 0.6  # SimMIM's
BRIGHT = 128  # a mask image's pixel at or above this (in grayscale) masks its patch's share
#: The graph with bool_masked_pos as an input, which optimum's masked-im export lacks.
MASKED_IMAGE_MODEL = HandBuilt("masked_image_modeling", SINGLE_GRAPH)


@dataclass(frozen=True)
class MaskedPixels:
    """One image's pixel_values and its bool_masked_pos [patches], one row for the batcher."""

    values: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return budget_tokens(self.values)


class MaskedImageModelingPipeline(ImagePipeline[inference_pb2.ReconstructImageRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        (mask_input,) = [node for node in self.session.session.get_inputs() if node.name == "bool_masked_pos"]
        self.patches = int(mask_input.shape[1])
        self.grid = round(self.patches**0.5)  # patches per row and per column (square images)
        processing = self.processor.processing
        self.input_size = (processing.crop_width or processing.width, processing.crop_height or processing.height)

    def feeds(self, inputs: Sequence[MaskedPixels | PixelValues]) -> dict[str, np.ndarray]:
        """Rows without a mask of their own (warm-up, the batchmate-drift check) see every patch."""
        unmasked = np.zeros(self.patches, dtype=bool)
        masks = [image.mask if isinstance(image, MaskedPixels) else unmasked for image in inputs]
        return super().feeds(inputs) | {"bool_masked_pos": np.stack(masks)}

    def preprocess(self, request: inference_pb2.ReconstructImageRequest) -> Prepared:
        require_batch(request.images, "images")
        images = [image.values for image in self.pixel_values(request.images)]
        masks = self.masks(request, len(images))
        return Prepared([MaskedPixels(values, mask) for values, mask in zip(images, masks, strict=True)])

    def masks(self, request: inference_pb2.ReconstructImageRequest, count: int) -> list[np.ndarray]:
        """Each image's bool_masked_pos: the request's masks (none, one for all, or one each)."""
        given = len(request.masks)
        if given not in (0, 1, count):
            raise InvalidArgument(f"{given} masks for {count} images: send none (random masks), one, or one per image")
        if given == 0:
            ratio = _mask_ratio(request.mask_ratio)
            generator = np.random.default_rng(request.seed)
            return [self._random(generator, ratio) for _ in range(count)]
        masks = [self._mask(mask, index) for index, mask in enumerate(request.masks)]
        return masks * count if given == 1 else masks

    def _random(self, generator: np.random.Generator, ratio: float) -> np.ndarray:
        mask = np.zeros(self.patches, dtype=bool)
        mask[generator.permutation(self.patches)[: round(ratio * self.patches)]] = True
        return mask

    def _mask(self, mask: inference_pb2.PatchMask, index: int) -> np.ndarray:
        source = mask.WhichOneof("source")
        if source == "patches":
            indices = np.array(mask.patches.indices, dtype=np.int64)
            outside = indices[indices >= self.patches]
            if outside.size:
                raise InvalidArgument(
                    f"mask {index}: patch {int(outside[0])} is outside the model's {self.grid} x {self.grid} grid "
                    f"(indices 0..{self.patches - 1})"
                )
            result = np.zeros(self.patches, dtype=bool)
            result[indices] = True
            return result
        if source == "image":
            try:
                return self._from_image(decode(mask.image, index))
            except InvalidArgument as error:
                raise InvalidArgument(f"mask {index}: {error}") from None
        raise InvalidArgument(f"mask {index} is empty: set its patches or its image")

    def _from_image(self, image: Image.Image) -> np.ndarray:
        """A patch is masked when at least half of its pixels are bright, at the model's input size."""
        bright = np.asarray(image.convert("L").resize(self.input_size, Image.Resampling.NEAREST)) >= BRIGHT
        side = self.input_size[1] // self.grid
        shares = bright.reshape(self.grid, side, self.grid, side).mean(axis=(1, 3))
        return (shares >= 0.5).ravel()

    def postprocess(
        self, request: inference_pb2.ReconstructImageRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ReconstructImageResponse:
        response = inference_pb2.ReconstructImageResponse()
        for image, row in zip(prepared.sequences, outputs, strict=True):
            reconstruction = row["reconstruction"].astype("<f4", copy=False)
            response.results.add(
                image=self.png(reconstruction),
                reconstruction=reconstruction.tobytes(),
                shape=reconstruction.shape,
                loss=self.loss(image, reconstruction),
                masked_patches=np.flatnonzero(image.mask).tolist(),
            )
        return response

    def loss(self, image: MaskedPixels, reconstruction: np.ndarray) -> float:
        """ViTForMaskedImageModeling's loss, for this image alone."""
        side = reconstruction.shape[1] // self.grid
        mask = image.mask.reshape(self.grid, self.grid).repeat(side, axis=0).repeat(side, axis=1).astype(np.float32)
        distance = np.abs(image.values - reconstruction) * mask
        return float(distance.sum() / (mask.sum() + np.float32(1e-5)) / reconstruction.shape[0])

    def png(self, reconstruction: np.ndarray) -> bytes:
        """The reconstruction in pixels: the processor's normalize and rescale undone."""
        values = reconstruction.transpose(1, 2, 0)
        if self.processor.mean.size:
            values = values * self.processor.std + self.processor.mean
        if self.processor.processing.rescale_factor:
            values = values / self.processor.processing.rescale_factor
        pixels = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()


def _mask_ratio(ratio: float) -> float:
    if ratio == 0:
        return DEFAULT_MASK_RATIO
    if not 0 < ratio < 1:
        raise InvalidArgument(f"mask_ratio {ratio} is not between 0 and 1 (exclusive)")
    return ratio


REGISTRATION = TaskRegistration(
    name="masked-image-modeling",
    task=common_pb2.TASK_MASKED_IMAGE_MODELING,
    pipeline=MaskedImageModelingPipeline,
    rpcs=frozenset({"ReconstructImage"}),
    kserve_image=KServeImage("ReconstructImage"),
    export=ExportSpec("masked-im", "AutoModelForMaskedImageModeling", hand_built=(MASKED_IMAGE_MODEL,)),
    inputs="images",
)
