"""DetectObjects at parity with transformers.pipeline("object-detection") on tiny random DETR (a
ResNet backbone from transformers, no timm) and YOLOS checkpoints built here with their processors,
which keep each image's aspect ratio: encoded files of every format the contract names, raw pixels,
Pillow images, at several thresholds; the export's image processing against the processor's on
many sizes; and the bad inputs refused with INVALID_ARGUMENT, after which the server goes on."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.client import AsyncClient
from onnxserve.export.errors import ExportError
from onnxserve.export.images import check_image_processing, image_processing
from onnxserve.export.tasks import check_exportable, task_spec
from onnxserve.server.quality.gates import mean_iou
from PIL import Image
from transformers import (
    AutoImageProcessor,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    MaskFormerConfig,
    PreTrainedModel,
    ResNetConfig,
    RTDetrConfig,
    YolosConfig,
    YolosForObjectDetection,
    YolosImageProcessor,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.node_tools import run_node
from tests.test_classify_image import FILES, RAW, picture, raw
from tests.test_kserve import output
from tests.test_kserve_images import image_request
from tests.vision_heads import reference_pipeline, save_checkpoint

LABELS = ("cat", "dog", "bird", "car", "boat")
KINDS = ["detr-object-detection", "yolos-object-detection"]
# The processors' sizes, small: images keep their aspect ratio, shorter side 48, longer at most 128
# (YOLOS rounds sides down to a multiple of 16: a 33 x 257 image's 16 x 128 is no empty one).
SIZE = {"shortest_edge": 48, "longest_edge": 128}
# Below the pipeline's 0.5 default (random heads score about 1 / (labels + 1)) so that there are
# detections to compare, and 0 for every query.
THRESHOLDS = (0.0, 0.25)


def _labelled() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}


def _detr() -> tuple[PreTrainedModel, DetrImageProcessor]:
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, **_labelled(),
    )  # fmt: skip
    return DetrForObjectDetection(config), DetrImageProcessor(size=SIZE)


def _yolos() -> tuple[PreTrainedModel, YolosImageProcessor]:
    config = YolosConfig(
        image_size=[48, 64], patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_detection_tokens=8, **_labelled(),
    )  # fmt: skip
    return YolosForObjectDetection(config), YolosImageProcessor(size=SIZE)


BUILDERS = {"detr-object-detection": _detr, "yolos-object-detection": _yolos}


def build(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    # The class logits spread: clear labels, and scores on both sides of 0.5.
    return save_checkpoint(*BUILDERS[kind](), directory, {"class_labels_classifier": 2.0})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {kind: export(kind, source=build(kind, tmp_path_factory.mktemp(kind))) for kind in KINDS}


def reference(checkpoint: Path):
    return reference_pipeline("object-detection", checkpoint)


def assert_same_detections(served: list, expected: list[dict]) -> None:
    """The same objects in the same (query) order: labels identical, scores within 1e-4, box corners
    within one pixel (the pipeline truncates float corners, which rounding may move across a
    whole pixel)."""
    assert len(served) == len(expected), (served, expected)
    for got, want in zip(served, expected, strict=True):
        assert got.label == want["label"]
        assert got.score == pytest.approx(want["score"], abs=1e-4)
        corners = [got.box.xmin, got.box.ymin, got.box.xmax, got.box.ymax]
        want_corners = [want["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")]
        assert np.abs(np.subtract(corners, want_corners)).max() <= 1, (corners, want_corners)


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_encoded_files_match_the_pipeline(fp32_server, exported, kind, threshold):
    with fp32_server.client() as client:
        response = client.detect_objects(model=kind, images=list(FILES.values()), threshold=threshold)
    expected = reference(exported[kind].checkpoint)([_opened(data) for data in FILES.values()], threshold=threshold)
    assert len(response) == len(FILES) and response.metadata.model == kind
    for served, want in zip(response, expected, strict=True):
        assert_same_detections(served, want)
    assert sum(map(len, response)) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_raw_pixels_pillow_images_and_the_default_threshold(fp32_server, exported, kind):
    images = [Image.fromarray(pixels) for pixels in RAW.values()]
    with fp32_server.client() as client:
        from_arrays = client.detect_objects(model=kind, images=list(RAW.values()), threshold=0.0)
        from_pillow = client.detect_objects(model=kind, images=images)
    run = reference(exported[kind].checkpoint)
    for arrays, pillows, want_all, want_default in zip(
        from_arrays, from_pillow, run(images, threshold=0.0), run(images), strict=True
    ):
        assert_same_detections(arrays, want_all)
        assert_same_detections(pillows, want_default)


def test_boxes_are_in_the_original_images_pixels(fp32_server):
    """The same picture at two sizes: every box scales with the image (the model sees the same
    resized pixels), within the pixel the truncation may take."""
    small, large = picture(40, 30, 3), picture(80, 60, 3)
    with fp32_server.client() as client:
        both = client.detect_objects(model=KINDS[0], images=[small, large], threshold=0.0)
    for at_small, at_large in zip(both[0], both[1], strict=True):
        assert at_small.label == at_large.label
        small_corners = np.array([at_small.box.xmin, at_small.box.ymin, at_small.box.xmax, at_small.box.ymax])
        large_corners = np.array([at_large.box.xmin, at_large.box.ymin, at_large.box.xmax, at_large.box.ymax])
        assert np.abs(small_corners * 2 - large_corners).max() <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_reproduces_the_processors_resize_on_many_sizes(exported, kind):
    processor = AutoImageProcessor.from_pretrained(exported[kind].checkpoint, use_fast=False)
    processing = image_processing(processor)
    assert (processing.shortest_edge, processing.longest_edge) == (48, 128)
    assert processing.size_multiple == (16 if kind.startswith("yolos") else 0)
    processor.size = {"shortest_edge": 37, "longest_edge": 150}  # odd sizes; 33 x 257 meets the bound
    processing.shortest_edge, processing.longest_edge = 37, 150
    check_image_processing(processor, processing)


@pytest.mark.parametrize(
    ("config", "task"), [(RTDetrConfig(), "object-detection"), (MaskFormerConfig(), "image-segmentation")]
)
def test_the_export_refuses_heads_whose_post_processing_is_not_built(config, task):
    """optimum exports RT-DETR (sigmoid scores) for object detection and MaskFormer for image
    segmentation, but the server post-processes neither: the export says so before any work."""
    with pytest.raises(ExportError, match=f"{task} is served for .* models, not '{config.model_type}' yet"):
        check_exportable(config, task_spec(task))


def test_the_gates_box_iou():
    reference = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 5, 5]], dtype=np.float32)  # the last one empty
    variant = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [5, 5, 5, 5]], dtype=np.float32)
    assert mean_iou(reference, variant) == pytest.approx((1 / 7 + 1 + 1) / 3)
    assert mean_iou(reference[:2], np.array([[2, 2, 3, 3], [0, 0, 1, 1]], dtype=np.float32)) == pytest.approx(0.5)


def test_int8_finds_the_same_labels_and_passed_its_load_check(int8_server, exported):
    kind = KINDS[0]
    images = [_opened(FILES[name]) for name in ("png", "jpeg", "large-jpeg")]
    with int8_server.client() as client:
        response = client.detect_objects(model=kind, images=images, threshold=0.0)
        info = client.get_model(kind)
    expected = reference(exported[kind].checkpoint)(images, threshold=0.0)
    assert response.metadata.precision == "int8" and info.precision == "int8"
    labels = [[x.label for x in served] for served in response]
    assert labels == [[x["label"] for x in want] for want in expected]


def test_the_command_prints_detections(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    path = tmp_path / "picture.png"
    path.write_bytes(FILES["png"])
    main(["detect", "--model", KINDS[0], "--target", fp32_server.target, "--json", "--threshold", "0", str(path)])
    printed = json.loads(capsys.readouterr().out)
    with fp32_server.client() as client:
        expected = client.detect_objects(model=KINDS[0], images=[path], threshold=0.0)
    assert [[x["label"] for x in image] for image in printed["results"]] == [[x.label for x in r] for r in expected]
    assert printed["results"][0][0]["box"] == vars(expected[0][0].box)


def test_the_async_client_detects_objects(fp32_server):
    images = [FILES["png"], RAW["rgb"]]

    async def detect() -> list:
        async with AsyncClient(fp32_server.target, timeout=60) as client:
            return (await client.detect_objects(model=KINDS[0], images=images, threshold=0.0)).results

    with fp32_server.client() as client:
        expected = client.detect_objects(model=KINDS[0], images=images, threshold=0.0)
    assert asyncio.run(detect()) == expected.results and expected[0]


def test_the_node_client_detects_objects(fp32_server, tmp_path):
    path = tmp_path / "picture.jpeg"
    path.write_bytes(FILES["jpeg"])
    script = """
const { OnnxServeClient } = require(".");
const [target, model, file] = process.argv.slice(1);
const client = new OnnxServeClient(target, { timeoutMs: 60000 });
client.detectObjects({ model, images: [{ data: require("fs").readFileSync(file) }], threshold: 0 })
  .then((response) => process.stdout.write(JSON.stringify(response.results[0].objects)))
  .finally(() => client.close());
"""
    objects = json.loads(run_node(script, fp32_server.target, KINDS[0], str(path)))
    with fp32_server.client() as client:
        (expected,) = client.detect_objects(model=KINDS[0], images=[path], threshold=0.0)
    assert [(x["label"], x["box"]) for x in objects] == [(x.label, vars(x.box)) for x in expected]
    assert [x["score"] for x in objects] == pytest.approx([x.score for x in expected])


def test_kserve_image_input_detects_like_detect_objects(fp32_server):
    """A BYTES input `image` runs DetectObjects: one tensor per leaf (`label`, `score`, `xmin`, ...),
    [images, most objects], padded ("", NaN, -1)."""
    images = [FILES["png"], FILES["jpeg-exif-rotated"]]
    with grpc.insecure_channel(fp32_server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            image_request(KINDS[0], images, threshold="0.25"), timeout=30
        )
    with fp32_server.client() as client:
        typed = client.detect_objects(model=KINDS[0], images=images, threshold=0.25)
    most = max(map(len, typed))
    assert output(response, "label").shape == (len(images), most) and most > 0
    for row, objects in enumerate(typed):
        found = slice(0, len(objects))
        assert output(response, "label")[row, found].tolist() == [x.label for x in objects]
        np.testing.assert_array_equal(output(response, "score")[row, found], [x.score for x in objects])
        assert output(response, "xmax")[row, found].tolist() == [x.box.xmax for x in objects]


def _call(target: str, request: inference_pb2.DetectObjectsRequest) -> inference_pb2.DetectObjectsResponse:
    with grpc.insecure_channel(target) as channel:
        return inference_pb2_grpc.InferenceStub(channel).DetectObjects(request, timeout=30)


@pytest.mark.parametrize(
    ("request_fields", "words"),
    [
        (
            {"images": [inference_pb2.Image(data=FILES["png"]), inference_pb2.Image(data=b"not an image")]},
            "image 1 (12 bytes) is not a PNG, JPEG",
        ),
        ({"images": [inference_pb2.Image(data=FILES["png"][:60])]}, "image 0 (PNG) cannot be decoded"),
        ({"images": []}, "holds no images"),
        ({"images": [raw(1, 300, 3)]}, "an image of 1 x 300 pixels is too narrow for DetrImageProcessor"),
        ({"images": [inference_pb2.Image(data=FILES["png"])], "threshold": float("nan")}, "threshold is NaN"),
    ],
)
def test_bad_requests_are_refused_and_the_server_goes_on(fp32_server, request_fields, words):
    with pytest.raises(grpc.RpcError) as refused:
        _call(fp32_server.target, inference_pb2.DetectObjectsRequest(model=KINDS[0], **request_fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in refused.value.details()
    good = _call(fp32_server.target, inference_pb2.DetectObjectsRequest(
        model=KINDS[0], images=[inference_pb2.Image(data=FILES["png"])], threshold=0.0,
    ))  # fmt: skip
    assert len(good.results) == 1 and good.results[0].objects


def test_other_requests_are_refused_naming_what_the_model_serves(fp32_server):
    with fp32_server.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.segment_image(model=KINDS[0], images=[FILES["png"]])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "it serves DetectObjects" in refused.value.details()
