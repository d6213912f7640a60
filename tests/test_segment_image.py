"""SegmentImage at parity with transformers.pipeline("image-segmentation") on tiny random
checkpoints built here with their processors: a Segformer's semantic segmentation of encoded files
of every format the contract names, raw pixels and Pillow images, and a DETR panoptic head's
(DetrForSegmentation, a ResNet backbone from transformers) panoptic, instance and semantic
segmentation; masks equal to the pipeline's but where the two best classes (or queries) of a pixel
tie within rounding; both mask forms (PNG and bit-packed) carrying the same pixels; the upsampling
against torch's own; and the bad inputs refused with INVALID_ARGUMENT, after which the server goes
on."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from onnxserve.client.results import Segment
from onnxserve.server.api.kserve.tensors import split_bytes
from onnxserve.server.quality.gates import mean_iou
from onnxserve.server.tasks import image_segmentation
from onnxserve.server.tasks.image_segmentation import pixel_classes, query_segments
from PIL import Image, ImageOps
from transformers import (
    DetrConfig,
    DetrForSegmentation,
    DetrImageProcessor,
    PreTrainedModel,
    ResNetConfig,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.node_tools import run_node
from tests.test_classify_image import FILES, RAW
from tests.test_kserve import output
from tests.test_kserve_images import image_request
from tests.vision_heads import reference_pipeline, save_checkpoint

LABELS = ("sky", "tree", "road", "car", "person")
KINDS = ["segformer-semantic-segmentation", "detr-panoptic-segmentation"]
KIND, PANOPTIC = KINDS
# Where the upsampled maps of a pixel's two best classes (or queries) are closer than this, either
# may win.
TIE = 1e-4


def _labelled() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}


def _segformer() -> tuple[PreTrainedModel, SegformerImageProcessor]:
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], **_labelled(),
    )  # fmt: skip
    return SegformerForSemanticSegmentation(config), SegformerImageProcessor(size={"height": 32, "width": 32})


def _detr_panoptic() -> tuple[PreTrainedModel, DetrImageProcessor]:
    # The mask head reads four backbone stages; its group norms need d_model + heads divisible by 8.
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], out_features=stages)
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, **_labelled(),
    )  # fmt: skip
    processor = DetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 128}, format="coco_panoptic")
    return DetrForSegmentation(config), processor


BUILDERS = {KIND: _segformer, PANOPTIC: _detr_panoptic}
# The class heads' weights, spread (uniform in +-spread) so that every label covers some pixels; DETR's
# less, so that no query's score outweighs every other's mask and images have several segments.
SPREADS = {"decode_head.classifier.weight": 2.0, "detr.class_labels_classifier.weight": 0.5}


def build(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(*BUILDERS[kind](), directory, SPREADS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {kind: export(kind, source=build(kind, tmp_path_factory.mktemp(kind))) for kind in KINDS}


def reference(checkpoint: Path):
    return reference_pipeline("image-segmentation", checkpoint)


def ties(checkpoint: Path, image: Image.Image, subtask: str = "semantic", threshold: float = 0.0) -> np.ndarray:
    """The pixels of an image whose two best classes (semantic) or queries (panoptic) are within
    TIE in PyTorch's upsampled maps, as post-processing computes them."""
    upright = ImageOps.exif_transpose(image).convert("RGB")
    model, processor = reference(checkpoint).model, reference(checkpoint).image_processor
    pixels = processor(images=upright, return_tensors="pt")["pixel_values"]
    size = upright.size[::-1]
    with torch.no_grad():
        if not hasattr(processor, "post_process_panoptic_segmentation"):
            maps = torch.nn.functional.interpolate(model(pixel_values=pixels).logits, size=size, mode="bilinear")[0]
        else:
            outputs = model(pixel_values=pixels)
            probabilities, masks = outputs.logits[0].softmax(-1), outputs.pred_masks[0].sigmoid()
            if subtask == "semantic":
                maps = torch.einsum("qc,qhw->chw", probabilities[:, :-1], masks)
                maps = torch.nn.functional.interpolate(maps[None], size=size, mode="bilinear")[0]
            else:
                scores, classes = probabilities.max(-1)
                kept = (classes != len(LABELS)) & (scores > threshold)
                if kept.sum() < 2:  # no query, or one: no pixel to share
                    return np.zeros(size, dtype=bool)
                maps = torch.nn.functional.interpolate(masks[kept][None], size=size, mode="bilinear")[0]
                maps = maps * scores[kept][:, None, None]
    best = maps.topk(2, dim=0).values
    return (best[0] - best[1] < TIE).numpy()


def assert_same_segments(served: list, expected: list[dict], tied: np.ndarray) -> None:
    """The same labels in the same order, the same scores (None for semantic segmentation), and
    each mask equal to the pipeline's but where the pixel's best classes or queries tie; the PNG
    and the packed mask the same."""
    assert [s.label for s in served] == [e["label"] for e in expected]
    for got, want in zip(served, expected, strict=True):
        assert (got.score is None) == (want["score"] is None)
        assert want["score"] is None or got.score == pytest.approx(want["score"], abs=1e-4)
        png = np.asarray(Image.open(io.BytesIO(got.mask)))
        assert Image.open(io.BytesIO(got.mask)).mode == "L" and set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, got.mask_array)
        differ = got.mask_array != (np.asarray(want["mask"]) == 255)
        assert not (differ & ~tied).any()


@pytest.mark.parametrize("name", list(FILES))
def test_encoded_files_match_the_pipeline(fp32_server, exported, name):
    checkpoint, image = exported[KIND].checkpoint, Image.open(io.BytesIO(FILES[name]))
    with fp32_server.client() as client:
        response = client.segment_image(model=KIND, images=[FILES[name]])
    assert response.metadata.model == KIND
    assert_same_segments(response[0], reference(checkpoint)(image), ties(checkpoint, image))
    assert response[0][0].mask_array.shape == ImageOps.exif_transpose(image).size[::-1]  # the upright image's


def test_a_batch_of_raw_pixels_and_pillow_images_matches_the_pipeline(fp32_server, exported):
    checkpoint, images = exported[KIND].checkpoint, [Image.fromarray(pixels) for pixels in RAW.values()]
    with fp32_server.client() as client:
        from_arrays = client.segment_image(model=KIND, images=list(RAW.values()), subtask="semantic")
        from_pillow = client.segment_image(model=KIND, images=images)
    for arrays, pillows, image, want in zip(
        from_arrays, from_pillow, images, reference(checkpoint)(images), strict=True
    ):
        assert_same_segments(arrays, want, ties(checkpoint, image))
        assert_same_segments(pillows, want, ties(checkpoint, image))
    assert len({s.label for r in from_arrays for s in r}) > 1


PANOPTIC_FILES = ("png", "jpeg", "png-rgba", "png-5x7", "jpeg-exif-rotated", "large-jpeg")
# Subtasks and thresholds. A random head's scores are low, and the mask threshold applies to masks
# weighed by them: low thresholds leave segments to compare; the defaults (likely none) compare too.
PANOPTIC_OPTIONS = [
    (None, {}),
    ("panoptic", {"threshold": 0.0, "mask_threshold": 0.05}),
    ("instance", {"threshold": 0.0, "mask_threshold": 0.05}),
    ("panoptic", {"threshold": 0.2, "mask_threshold": 0.1, "overlap_mask_area_threshold": 0.8}),
    ("semantic", {}),
]


@pytest.mark.parametrize(("subtask", "thresholds"), PANOPTIC_OPTIONS)
def test_detrs_panoptic_head_matches_the_pipeline(fp32_server, exported, subtask, thresholds):
    checkpoint = exported[PANOPTIC].checkpoint
    images = [Image.open(io.BytesIO(FILES[name])) for name in PANOPTIC_FILES]
    with fp32_server.client() as client:
        response = client.segment_image(model=PANOPTIC, images=images, subtask=subtask, **thresholds)
    for served, image in zip(response, images, strict=True):
        want = reference(checkpoint)(image, subtask=subtask, **thresholds)
        tied = ties(checkpoint, image, subtask or "panoptic", thresholds.get("threshold", 0.9))  # 0.9: the default
        assert_same_segments(served, want, tied)
    if thresholds.get("threshold") == 0.0 or subtask == "semantic":  # segments to compare in every image
        assert all(response)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("threshold", "mask_threshold", "overlap"), [(0.0, 0.05, 0.5), (0.3, 0.2, 0.8), (0.0, 0.5, 0.2)]
)
def test_query_segments_are_detrs_post_processing(seed, threshold, mask_threshold, overlap):
    """The panoptic post-processing on random logits and masks of many queries (a random tiny
    head's queries are too alike to share an image): every segment, its score and its pixels,
    against DetrImageProcessor.post_process_panoptic_segmentation, ties aside."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (12, len(LABELS) + 1)).astype(np.float32)
    rows, columns = np.mgrid[0:9, 0:13]  # each query's mask a disc: queries own the parts they outweigh
    centers, radii = rng.uniform((0, 0), (9, 13), (12, 2)), rng.uniform(2, 5, (12, 1, 1))
    distances = np.hypot(rows - centers[:, :1, None], columns - centers[:, 1:, None])
    masks = (3 * (radii - distances)).astype(np.float32)
    size = (50, 37)  # width, height
    served = query_segments({"logits": logits, "pred_masks": masks}, size, list(LABELS), 0, threshold,
                            mask_threshold, overlap)  # fmt: skip
    outputs = SimpleNamespace(logits=torch.from_numpy(logits)[None], pred_masks=torch.from_numpy(masks)[None])
    (expected,) = DetrImageProcessor().post_process_panoptic_segmentation(
        outputs, threshold, mask_threshold, overlap, target_sizes=[size[::-1]]
    )
    want = [
        {
            "label": LABELS[s["label_id"]],
            "score": s["score"],
            "mask": (expected["segmentation"] == s["id"]).numpy() * 255,
        }
        for s in expected["segments_info"]
    ]
    assert len(want) >= 2 or overlap > 0.5  # several segments, but where the overlap rule is strict
    assert_same_segments([Segment.from_proto(s) for s in served], want, np.zeros(size[::-1], dtype=bool))


@pytest.mark.parametrize(("height", "width", "target"), [(8, 8, (5, 7)), (8, 8, (480, 640)), (6, 9, (257, 33))])
def test_the_upsampling_is_torchs(height, width, target):
    logits = np.random.default_rng(0).normal(size=(4, height, width)).astype(np.float32)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=target, mode="bilinear")[0]
    best = upsampled.topk(2, dim=0).values
    decided = (best[0] - best[1] >= TIE).numpy()
    classes = pixel_classes(logits, target[1], target[0])
    np.testing.assert_array_equal(classes[decided], upsampled.argmax(0).numpy()[decided])


def test_the_upsampling_is_the_same_a_row_at_a_time(monkeypatch):
    logits = np.random.default_rng(1).normal(size=(3, 5, 6)).astype(np.float32)
    whole = pixel_classes(logits, 23, 17)
    monkeypatch.setattr(image_segmentation, "UPSAMPLED_VALUES", 3 * 23)  # one row per block
    np.testing.assert_array_equal(pixel_classes(logits, 23, 17), whole)


def test_the_gates_mask_iou():
    """Label maps: per label either has; soft masks: the smaller over the larger, per query."""
    assert mean_iou(np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 1]])) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_iou(np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, 2]])) == pytest.approx((3 / 4 + 0) / 2)
    soft, other = np.array([[[0.5, 1.0]], [[0.2, 0.2]]]), np.array([[[0.25, 1.0]], [[0.2, 0.2]]])
    assert mean_iou(soft, other) == pytest.approx((1.25 / 1.5 + 1) / 2)


def test_the_command_writes_the_masks(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    path = tmp_path / "picture.png"
    path.write_bytes(FILES["png"])
    main(["segment", "--model", KIND, "--target", fp32_server.target, "--masks", str(tmp_path / "masks"), str(path)])
    printed = capsys.readouterr().out
    with fp32_server.client() as client:
        expected = client.segment_image(model=KIND, images=[path])
    masks = {f"picture.{i}.{s.label}.png": s.mask for i, s in enumerate(expected[0])}
    assert {f.name: f.read_bytes() for f in (tmp_path / "masks").iterdir()} == masks
    assert all(segment.label in printed for segment in expected[0])
    main(["segment", "--model", KIND, "--target", fp32_server.target, "--json", str(path)])
    assert [s["label"] for s in json.loads(capsys.readouterr().out)["results"][0]] == [s.label for s in expected[0]]


def test_the_node_client_segments_images(fp32_server, tmp_path):
    """Node gets the segments and both masks: its unpacked bits are the Python client's pixels."""
    path = tmp_path / "picture.png"
    path.write_bytes(FILES["png"])
    script = """
const { OnnxServeClient } = require(".");
const [target, model, file] = process.argv.slice(1);
const client = new OnnxServeClient(target, { timeoutMs: 60000 });
const bit = (bits, i) => (bits[i >> 3] >> (7 - (i & 7))) & 1;
client.segmentImage({ model, images: [{ data: require("fs").readFileSync(file) }] })
  .then((response) => process.stdout.write(JSON.stringify(response.results[0].segments.map((s) => ({
    label: s.label, png: s.mask.toString("base64"), width: s.packedMask.width, height: s.packedMask.height,
    pixels: Array.from({ length: s.packedMask.width * s.packedMask.height }, (_, i) => bit(s.packedMask.bits, i)),
  })))))
  .finally(() => client.close());
"""
    segments = json.loads(run_node(script, fp32_server.target, KIND, str(path)))
    with fp32_server.client() as client:
        (expected,) = client.segment_image(model=KIND, images=[path])
    assert [s["label"] for s in segments] == [s.label for s in expected]
    for got, want in zip(segments, expected, strict=True):
        assert base64.b64decode(got["png"]) == want.mask
        pixels = np.array(got["pixels"], dtype=bool).reshape(got["height"], got["width"])
        np.testing.assert_array_equal(pixels, want.mask_array)


def test_kserve_image_input_segments_like_segment_image(fp32_server):
    """A BYTES input `image` runs SegmentImage (the subtask a string parameter): `label`, `score`,
    `mask` (the PNGs), `width`, `height`, `bits`, each [images, most segments]."""
    images = [FILES["png"], FILES["large-jpeg"]]
    with grpc.insecure_channel(fp32_server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            image_request(PANOPTIC, images, subtask="semantic"), timeout=30
        )
    with fp32_server.client() as client:
        typed = client.segment_image(model=PANOPTIC, images=images, subtask="semantic")
    index = [o.name for o in response.outputs].index("mask")
    masks = np.array(split_bytes("mask", response.raw_output_contents[index]), dtype=object)
    masks = masks.reshape(response.outputs[index].shape)
    for row, segments in enumerate(typed):
        found = slice(0, len(segments))
        assert output(response, "label")[row, found].tolist() == [s.label for s in segments]
        assert masks[row, found].tolist() == [s.mask for s in segments]
        assert output(response, "width")[row, found].tolist() == [s.mask_array.shape[1] for s in segments]


def _call(target: str, request: inference_pb2.SegmentImageRequest) -> inference_pb2.SegmentImageResponse:
    with grpc.insecure_channel(target) as channel:
        return inference_pb2_grpc.InferenceStub(channel).SegmentImage(request, timeout=30)


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        (
            {"images": [inference_pb2.Image(data=FILES["png"]), inference_pb2.Image(data=b"not an image")]},
            "image 1 (12 bytes) is not a PNG, JPEG",
        ),
        ({"images": [inference_pb2.Image(data=FILES["png"][:60])]}, "image 0 (PNG) cannot be decoded"),
        (
            {
                "images": [inference_pb2.Image(data=FILES["png"])],
                "subtask": inference_pb2.SEGMENTATION_SUBTASK_PANOPTIC,
            },
            "has no panoptic segmentation: it serves semantic",
        ),
        ({"images": [inference_pb2.Image(data=FILES["png"])], "mask_threshold": float("nan")}, "mask_threshold is NaN"),
    ],
)
def test_bad_requests_are_refused_and_the_server_goes_on(fp32_server, request_fields, words):
    with pytest.raises(grpc.RpcError) as refused:
        _call(fp32_server.target, inference_pb2.SegmentImageRequest(model=KIND, **request_fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()
    good = _call(fp32_server.target, inference_pb2.SegmentImageRequest(
        model=KIND, images=[inference_pb2.Image(data=FILES["png"])],
    ))  # fmt: skip
    assert len(good.results) == 1 and good.results[0].segments


def test_int8_agrees_on_most_pixels_and_passed_its_load_check(int8_server, exported):
    image = Image.open(io.BytesIO(FILES["large-jpeg"]))
    with int8_server.client() as client:
        response = client.segment_image(model=KIND, images=[image])
        info = client.get_model(KIND)
    expected = reference(exported[KIND].checkpoint)(image)
    served = np.full(image.size[::-1], -1)
    for segment in response[0]:
        served[segment.mask_array] = LABELS.index(segment.label)
    want = np.full(image.size[::-1], -2)
    for segment in expected:
        want[np.asarray(segment["mask"]) == 255] = LABELS.index(segment["label"])
    assert response.metadata.precision == "int8" and info.precision == "int8"
    assert (served == want).mean() > 0.9
