"""CaptionImage: image-to-text with a vision encoder and a text decoder (VisionEncoderDecoder:
ViT + GPT-2, ...), as the image-to-text pipeline does it: the image processor's pixel_values into
the encoder, then the generation pipeline's seq2seq decoding from the decoder start token (greedy,
beams, sampling, the KV cache), one caption per image. Only the encoder's inputs differ from
text2text generation: the images' pixel_values instead of the tokenized prompts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.tasks.base import ModelResources, require_batch
from onnxserve.server.tasks.generation.drivers import run
from onnxserve.server.tasks.generation.pipeline import GenerationPipeline
from onnxserve.server.tasks.generation.preparation import GenerationRequest
from onnxserve.server.tasks.images import decode, image_processor
from onnxserve.server.tasks.registration import SEQ2SEQ_GRAPHS, ExportSpec, KServeImage, TaskRegistration

from onnxserve.v1 import common_pb2, inference_pb2


class ImageToTextPipeline(GenerationPipeline):
    """The generation pipeline of an encoder-decoder whose encoder takes pixel_values."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        if not self.seq2seq:
            raise ModelLoadError(f"an image-to-text model needs an encoder graph; got {sorted(self.sessions)}")
        self.processor = image_processor(resources)

    async def run(
        self, rpc: str, request: inference_pb2.CaptionImageRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.CaptionImageResponse:
        """CaptionImage. A deadline ends the call through gRPC's cancellation, within one step."""
        generation = await self._start(lambda: self._setup(request.images, request.parameters, timings), timings)
        response = await run(generation, self.executors.generation)
        return inference_pb2.CaptionImageResponse(results=response.results)

    def _setup(
        self,
        images: Sequence[inference_pb2.Image],
        parameters: inference_pb2.GenerationParameters,
        timings: Timings,
    ) -> GenerationRequest:
        """Decodes and processes the images (INVALID_ARGUMENT naming a bad one), then sets the
        request up as a text2text one whose encoder inputs are the images' pixel_values."""
        require_batch(images, "images")
        pixel_values = timings.timed("tokenization", lambda: self._pixel_values(images))
        return self.setup.from_encoder_inputs({"pixel_values": pixel_values}, parameters, timings)

    def _pixel_values(self, images: Sequence[inference_pb2.Image]) -> np.ndarray:
        return np.stack([self.processor(decode(image, index)) for index, image in enumerate(images)])


REGISTRATION = TaskRegistration(
    name="image-to-text",
    task=common_pb2.TASK_IMAGE_TO_TEXT,
    pipeline=ImageToTextPipeline,
    rpcs=frozenset({"CaptionImage"}),
    kserve_image=KServeImage("CaptionImage"),
    # As text2text generation: fp16 and int8 (dynamic) variants of the encoder and the merged
    # decoder, each judged on the first decoder step's logits against PyTorch's. The reference
    # loads through AutoModelForImageTextToText, which transformers 4.57 names instead of the
    # deprecated AutoModelForVision2Seq.
    export=ExportSpec(
        "image-to-text-with-past", "AutoModelForImageTextToText", graphs=SEQ2SEQ_GRAPHS, generation_config=True
    ),
    inputs="text and images",
)
