"""SegmentImage at parity with transformers.pipeline("image-segmentation") on a tiny random
Segformer built here with its processor: semantic segmentation of encoded files of every format
the contract names, raw pixels and Pillow images, masks equal to the pipeline's but where the two
best classes of a pixel tie within rounding; both mask forms (PNG and bit-packed) carrying the same
pixels; the upsampling against torch's own; and the bad inputs refused with INVALID_ARGUMENT, after
which the server goes on."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.server.tasks.image_segmentation import pixel_classes
from PIL import Image, ImageOps
from transformers import (
    AutoImageProcessor,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    pipeline,
)

from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.test_classify_image import FILES, RAW

LABELS = ("sky", "tree", "road", "car", "person")
KINDS = ["segformer-semantic-segmentation"]
KIND = KINDS[0]
# Where the upsampled logits of a pixel's two best classes are closer than this, either may win.
TIE = 1e-4


def build(directory: Path) -> Path:
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():  # spread the class logits, so that every label covers some pixels
        model.decode_head.classifier.weight.uniform_(-1, 1)
    model.eval().save_pretrained(directory)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {KIND: export(KIND, source=build(tmp_path_factory.mktemp(KIND)))}


@cache
def reference(checkpoint: Path):
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline("image-segmentation", model=str(checkpoint), image_processor=processor, device="cpu")


def ties(checkpoint: Path, image: Image.Image) -> np.ndarray:
    """The pixels of an image whose two best classes are within TIE after PyTorch's upsampling."""
    upright = ImageOps.exif_transpose(image).convert("RGB")
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    pixels = processor(images=upright, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = SegformerForSemanticSegmentation.from_pretrained(checkpoint)(pixel_values=pixels).logits
        upsampled = torch.nn.functional.interpolate(logits, size=upright.size[::-1], mode="bilinear")[0]
    best = upsampled.topk(2, dim=0).values
    return (best[0] - best[1] < TIE).numpy()


def assert_same_segments(served: list, expected: list[dict], tied: np.ndarray) -> None:
    """The same labels in the same order, no scores (semantic), and each mask equal to the
    pipeline's but where the pixel's best classes tie; the PNG and the packed mask the same."""
    assert [s.label for s in served] == [e["label"] for e in expected]
    for got, want in zip(served, expected, strict=True):
        assert got.score is None and want["score"] is None
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


@pytest.mark.parametrize(("height", "width", "target"), [(8, 8, (5, 7)), (8, 8, (480, 640)), (6, 9, (257, 33))])
def test_the_upsampling_is_torchs(height, width, target):
    logits = np.random.default_rng(0).normal(size=(4, height, width)).astype(np.float32)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(logits)[None], size=target, mode="bilinear")[0]
    best = upsampled.topk(2, dim=0).values
    decided = (best[0] - best[1] >= TIE).numpy()
    classes = pixel_classes(logits, target[1], target[0])
    np.testing.assert_array_equal(classes[decided], upsampled.argmax(0).numpy()[decided])


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
            "segments images semantically: it has no panoptic segmentation",
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
