"""EncodeImage: one embedding per image; and, for CLIP, Encode on its text tower, so that texts and
images are compared in one space, and ClassifyImage with candidate_labels from the two towers.

Image encoders (ViT, DINOv2, ...: optimum's feature-extraction graph, pixel_values ->
last_hidden_state, which the image-feature-extraction pipeline returns) are pooled to one vector:
the first ([CLS]) token's state by default, as DINOv2's pooler output, or the mean of every token's.
CLIP checkpoints are exported as their two towers (export/hand_built.py): EncodeImage runs the
vision tower (get_image_features), Encode the text tower (get_text_features), each through a
batcher of its own. Zero-shot ClassifyImage embeds the hypotheses and the images that way and
scores them as CLIPModel's logits_per_image (the cosines times the logit scale, which the text
tower's graph outputs), then as the zero-shot-image-classification pipeline (softmax over the
labels per image)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from google.protobuf.message import Message
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import batch_arrays
from onnxserve.server.tasks.base import ModelResources, Pipeline, Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.feature_extraction import FeatureExtractionPipeline, embeddings_response, unit_rows
from onnxserve.server.tasks.images import ImagePipeline
from onnxserve.server.tasks.registration import ExportSpec, HandBuilt, KServeImage, KServeText, TaskRegistration
from onnxserve.server.tasks.text_classification import hypotheses, ranked_labels
from onnxserve.server.tasks.zero_shot_image_classification import DEFAULT_HYPOTHESIS_TEMPLATE

from onnxserve.v1 import common_pb2, inference_pb2

#: CLIP's graphs as export/hand_built.py writes them.
CLIP_TOWERS = HandBuilt(
    "clip_towers",
    {"text": ("text_model.onnx",), "vision": ("vision_model.onnx",)},
    model_types=("clip",),
    inputs="text and images",
)
_POOLINGS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    common_pb2.POOLING_UNSPECIFIED: lambda hidden: hidden[0],
    common_pb2.POOLING_CLS: lambda hidden: hidden[0],
    common_pb2.POOLING_MEAN: lambda hidden: hidden.mean(axis=0),
}


def _projected_only(pooling: int, model: str) -> None:
    if pooling != common_pb2.POOLING_UNSPECIFIED:
        raise InvalidArgument(
            f"model {model!r} is a CLIP model: its embeddings are its projections (get_*_features), which take "
            "no pooling; leave pooling unspecified"
        )


class ImageEmbeddings(ImagePipeline[inference_pb2.EncodeImageRequest]):
    """EncodeImage on an image graph: last_hidden_state pooled, or CLIP's image_embeds."""

    def preprocess(self, request: inference_pb2.EncodeImageRequest) -> Prepared:
        require_batch(request.images, "images")
        if "image_embeds" in self.session.output_names:
            _projected_only(request.pooling, self.name)
        elif request.pooling not in _POOLINGS:
            raise InvalidArgument(
                f"pooling {common_pb2.Pooling.Name(request.pooling)} does not apply to images: use CLS or MEAN"
            )
        return Prepared(self.pixel_values(request.images))

    def postprocess(
        self, request: inference_pb2.EncodeImageRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.EncodeImageResponse:
        if "image_embeds" in self.session.output_names:
            vectors = np.stack([row["image_embeds"] for row in outputs])
        else:
            vectors = np.stack([_POOLINGS[request.pooling](row["last_hidden_state"]) for row in outputs])
        vectors = vectors.astype(np.float32, copy=False)
        embeddings = embeddings_response(unit_rows(vectors) if request.normalize else vectors).embeddings
        return inference_pb2.EncodeImageResponse(embeddings=embeddings)


class TextEmbeddings(FeatureExtractionPipeline):
    """Encode on CLIP's text tower: its text_embeds (get_text_features)."""

    def logit_scale(self) -> float:
        """CLIP's exp(logit_scale), a constant the graph outputs beside the embeddings."""
        feeds = batch_arrays(self.tokenizer.encode(["a"]), self.tokenizer.pad_token_id)
        return float(self.session.run(feeds)["logit_scale"][0])

    def preprocess(self, request: inference_pb2.EncodeRequest) -> Prepared:
        _projected_only(request.pooling, self.name)
        return super().preprocess(request)

    def postprocess(
        self, request: inference_pb2.EncodeRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.EncodeResponse:
        vectors = np.stack([row["text_embeds"] for row in outputs]).astype(np.float32, copy=False)
        return embeddings_response(unit_rows(vectors) if request.normalize else vectors)


class ImageFeatureExtractionPipeline(Pipeline[Message]):
    """EncodeImage on the image graph; where the version has CLIP's text tower too, Encode on it
    and zero-shot ClassifyImage from both. Each tower is a batched pipeline of its own over its
    own graph."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        sessions = resources.sessions
        towers = "vision" in sessions
        self.images = ImageEmbeddings(replace(resources, sessions={"model": sessions["vision" if towers else "model"]}))
        self.texts = TextEmbeddings(replace(resources, sessions={"model": sessions["text"]})) if towers else None
        self.parts: list[Pipeline] = [self.images, *([self.texts] if self.texts else [])]
        self.logit_scale = 0.0

    def open(self) -> None:
        for part in self.parts:
            part.open()
        if self.texts is not None:
            self.logit_scale = self.texts.logit_scale()

    async def close(self) -> None:
        for part in self.parts:
            await part.close()

    async def run(self, rpc: str, request: Message, timings: Timings, time_left: float | None) -> Message:
        if rpc == "EncodeImage":
            return await self.images.run(rpc, request, timings, time_left)
        if self.texts is None:
            raise InvalidArgument(
                f"model {self.name!r} encodes images only: {rpc} needs a model with a text tower (CLIP)"
            )
        if rpc == "ClassifyImage":
            return await self.classify(request, timings, time_left)
        return await self.texts.run(rpc, request, timings, time_left)

    async def classify(
        self, request: inference_pb2.ClassifyImageRequest, timings: Timings, time_left: float | None
    ) -> inference_pb2.ClassifyImageResponse:
        """Zero-shot: each image's cosines with the hypotheses, times the logit scale, softmaxed."""
        if not request.candidate_labels:
            raise InvalidArgument(f"model {self.name!r} classifies images zero-shot: send the candidate_labels")
        template = request.hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATE
        texts = inference_pb2.EncodeRequest(texts=hypotheses(template, request.candidate_labels), normalize=True)
        images = inference_pb2.EncodeImageRequest(images=request.images, normalize=True)
        image_vectors = _vectors(await self.images.run("EncodeImage", images, timings, time_left))
        text_vectors = _vectors(await self.texts.run("Encode", texts, timings, time_left))  # its tokens are counted
        labels, response = list(request.candidate_labels), inference_pb2.ClassifyImageResponse()
        for row in image_vectors @ text_vectors.T * np.float32(self.logit_scale):
            response.results.add().labels.extend(ranked_labels(softmax(row), labels, request.top_k))
        return response

    async def warm_up(self) -> None:
        for part in self.parts:
            await part.warm_up()

    def queue_depth(self) -> int | None:
        return sum(part.queue_depth() or 0 for part in self.parts)

    def observe_runs(self, callback: Callable[[int, int], None]) -> None:
        for part in self.parts:
            part.observe_runs(callback)


def _vectors(response: inference_pb2.EncodeResponse | inference_pb2.EncodeImageResponse) -> np.ndarray:
    return np.array([embedding.values for embedding in response.embeddings], dtype=np.float32)


REGISTRATION = TaskRegistration(
    name="image-feature-extraction",
    task=common_pb2.TASK_IMAGE_FEATURE_EXTRACTION,
    pipeline=ImageFeatureExtractionPipeline,
    rpcs=frozenset({"EncodeImage", "Encode", "ClassifyImage"}),
    kserve_text=KServeText("Encode", "texts"),  # CLIP's text tower
    kserve_image=KServeImage("EncodeImage"),
    export=ExportSpec("feature-extraction", "AutoModel", hand_built=(CLIP_TOWERS,)),
    inputs="images",
)
