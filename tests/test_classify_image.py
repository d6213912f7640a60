"""ClassifyImage at parity with transformers.pipeline("image-classification") on the same tiny
random checkpoints (ViT, ConvNeXt), built here with their preprocessor_config.json: encoded files
of every format the contract names, raw pixels (RGB, grayscale, RGBA), Pillow images; and the bad
inputs it refuses with INVALID_ARGUMENT, after which the server goes on."""

from __future__ import annotations

import io
import json
import struct
import zlib
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.export.errors import ExportError
from onnxserve.export.images import check_image_processing, image_processing
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessor,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTImageProcessor,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.parity import assert_same_ranking

LABELS = ("cat", "dog", "bird", "fish", "horse", "frog", "ship")  # more than the pipeline's top_k of 5
KINDS = [
    "vit-image-classification",
    "convnext-image-classification",
    "resnet-image-classification",
    "swin-image-classification",
    "deit-image-classification",
]


def _labelled() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}


def _vit() -> tuple[PreTrainedModel, ViTImageProcessor]:
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, **_labelled(),
    )  # fmt: skip
    return ViTForImageClassification(config), ViTImageProcessor(size={"height": 32, "width": 32})


def _convnext() -> tuple[PreTrainedModel, ConvNextImageProcessor]:
    # Layer scale 1: the blocks count (the default 1e-6 leaves them out); shortest edge 32 resizes to
    # 32 / crop_pct, then crops, with bicubic resampling.
    config = ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, layer_scale_init_value=1.0, **_labelled()
    )
    return ConvNextForImageClassification(config), ConvNextImageProcessor(size={"shortest_edge": 32}, resample=3)


def _resnet() -> tuple[PreTrainedModel, ConvNextImageProcessor]:
    # ResNet checkpoints use ConvNeXt's processor; at 64 it resizes by the shortest edge and crops.
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **_labelled())
    return ResNetForImageClassification(config), ConvNextImageProcessor(size={"shortest_edge": 64})


def _swin() -> tuple[PreTrainedModel, ViTImageProcessor]:
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, **_labelled()
    )
    return SwinForImageClassification(config), ViTImageProcessor(size={"height": 32, "width": 32})


def _deit() -> tuple[PreTrainedModel, DeiTImageProcessor]:
    config = DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, **_labelled(),
    )  # fmt: skip
    processor = DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    return DeiTForImageClassification(config), processor


BUILDERS = {
    "vit-image-classification": _vit,
    "convnext-image-classification": _convnext,
    "resnet-image-classification": _resnet,
    "swin-image-classification": _swin,
    "deit-image-classification": _deit,
}


def build(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model, processor = BUILDERS[kind]()
    with torch.no_grad():  # spread logits, so that the ranking is no near-tie
        for name, parameter in model.named_parameters():
            if name.startswith("classifier") and name.endswith("weight"):
                parameter.uniform_(-0.5, 0.5)
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {kind: export(kind, source=build(kind, tmp_path_factory.mktemp(kind))) for kind in KINDS}


@cache
def reference(checkpoint: Path):
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline("image-classification", model=str(checkpoint), image_processor=processor, device="cpu")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with structure (a ramp) and detail (noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray(np.clip(ramp + rng.normal(0, 50, ramp.shape), 0, 255).astype(np.uint8))


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    """A JPEG whose EXIF orientation (6: rotate 90° clockwise) the pipeline applies."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(picture(60, 20, 7), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [picture(30, 30, seed) for seed in (1, 2)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


FILES = {
    "png": encoded(picture(40, 30), "PNG"),
    "jpeg": encoded(picture(64, 48, 1), "JPEG", quality=90),
    "png-rgba": encoded(picture(50, 50, 2).convert("RGBA"), "PNG"),
    "png-grayscale": encoded(picture(45, 35, 3).convert("L"), "PNG"),
    "png-palette": encoded(picture(36, 36, 4).convert("P"), "PNG"),
    "png-5x7": encoded(picture(5, 7, 5), "PNG"),
    "webp": encoded(picture(48, 40, 6), "WEBP"),
    "bmp": encoded(picture(33, 44, 8), "BMP"),
    "gif-first-frame": animated_gif(),
    "tiff": encoded(picture(40, 64, 9), "TIFF"),
    "jpeg-exif-rotated": rotated_jpeg(),
    "large-jpeg": encoded(picture(640, 480, 10), "JPEG"),
}
RAW = {
    "rgb": np.asarray(picture(31, 23, 11)),
    "grayscale": np.asarray(picture(40, 20, 12).convert("L")),
    "rgba": np.asarray(picture(25, 35, 13).convert("RGBA")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_encoded_files_match_the_pipeline(fp32_server, exported, kind):
    with fp32_server.client() as client:
        response = client.classify_image(model=kind, images=list(FILES.values()))
    expected = reference(exported[kind].checkpoint)([Image.open(io.BytesIO(data)) for data in FILES.values()])
    assert len(response) == len(FILES) and response.metadata.model == kind
    for served, want in zip(response, expected, strict=True):
        assert len(served.labels) == 5  # the pipeline's default top_k
        assert_same_ranking(served, want, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_raw_pixels_and_pillow_images_match_the_pipeline(fp32_server, exported, kind):
    images = [Image.fromarray(pixels) for pixels in RAW.values()]
    with fp32_server.client() as client:
        from_arrays = client.classify_image(model=kind, images=list(RAW.values()), top_k=len(LABELS))
        from_pillow = client.classify_image(model=kind, images=images, top_k=len(LABELS))
    expected = reference(exported[kind].checkpoint)(images, top_k=len(LABELS))
    for arrays, pillows, want in zip(from_arrays, from_pillow, expected, strict=True):
        assert_same_ranking(arrays, want, 1e-4)
        assert_same_ranking(pillows, want, 1e-4)


def test_exif_orientation_is_applied(fp32_server):
    """The rotated JPEG is classified as its upright pixels are, not as its stored ones."""
    upright = np.asarray(Image.open(io.BytesIO(FILES["jpeg-exif-rotated"])).transpose(Image.Transpose.ROTATE_270))
    with fp32_server.client() as client:
        from_file = client.classify_image(model=KINDS[0], images=[FILES["jpeg-exif-rotated"]], top_k=len(LABELS))
        from_pixels = client.classify_image(model=KINDS[0], images=[upright], top_k=len(LABELS))
    assert upright.shape[:2] == (60, 20)
    assert [(x.label, x.score) for x in from_file[0].labels] == [(x.label, x.score) for x in from_pixels[0].labels]


def test_top_k(fp32_server, exported):
    kind = KINDS[0]
    with fp32_server.client() as client:
        two = client.classify_image(model=kind, images=[FILES["png"]], top_k=2)
        every = client.classify_image(model=kind, images=[FILES["png"]], top_k=100)
    expected = reference(exported[kind].checkpoint)(Image.open(io.BytesIO(FILES["png"])), top_k=100)
    assert len(two[0].labels) == 2 and len(every[0].labels) == len(LABELS)
    assert_same_ranking(every[0], expected, 1e-4)
    assert [x.label for x in two[0].labels] == [x.label for x in every[0].labels[:2]]


@pytest.mark.parametrize("kind", KINDS)
def test_int8_agrees_on_top1_and_passed_its_load_check(int8_server, exported, kind):
    images = [Image.open(io.BytesIO(data)) for data in FILES.values()]
    with int8_server.client() as client:
        response = client.classify_image(model=kind, images=list(FILES.values()))
        info = client.get_model(kind)
    expected = reference(exported[kind].checkpoint)(images)
    assert response.metadata.precision == "int8" and info.precision == "int8"
    assert [r.label for r in response] == [want[0]["label"] for want in expected]


def test_kserve_tensors_run_the_graph_on_pixel_values(fp32_server, exported):
    """KServe v2 tensor requests run the model's graph as they do for text models: the processor's
    pixel_values in, PyTorch's logits out. A text request is refused: images have no text mapping."""
    kind = KINDS[0]
    checkpoint = exported[kind].checkpoint
    images = [Image.open(io.BytesIO(FILES[name])) for name in ("png", "jpeg")]
    pixels = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)(images, return_tensors="np")["pixel_values"]
    tensor = v2.ModelInferRequest.InferInputTensor(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
    raw_pixels = pixels.astype("<f4").tobytes()
    request = v2.ModelInferRequest(model_name=kind, inputs=[tensor], raw_input_contents=[raw_pixels])
    text = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"a cat")
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(v2.ModelInferRequest(model_name=kind, inputs=[text]), timeout=30)
    (logits_output,) = [o for o in response.outputs if o.name == "logits"]
    index = list(response.outputs).index(logits_output)
    logits = np.frombuffer(response.raw_output_contents[index], "<f4").reshape(list(logits_output.shape))
    with torch.no_grad():
        expected = ViTForImageClassification.from_pretrained(checkpoint)(pixel_values=torch.from_numpy(pixels)).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and "'text' input" in refused.value.details()


def test_the_command_classifies_image_files(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    files = []
    for name in ("png", "jpeg-exif-rotated"):
        files.append(tmp_path / f"{name}.img")
        files[-1].write_bytes(FILES[name])
    command = ["classify-image", "--model", KINDS[0], "--target", fp32_server.target]
    main([*command, "--json", "--top-k", "3", *map(str, files)])
    printed = json.loads(capsys.readouterr().out)
    with fp32_server.client() as client:
        expected = client.classify_image(model=KINDS[0], images=files, top_k=3)
    labels = [[x["label"] for x in r["labels"]] for r in printed["results"]]
    assert labels == [[x.label for x in r.labels] for r in expected] and all(len(x) == 3 for x in labels)
    with pytest.raises(SystemExit) as failed:
        main([*command, str(tmp_path / "missing.png")])
    assert failed.value.code == 2 and "missing.png" in capsys.readouterr().err


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's shape."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def raw(width: int, height: int, channels: int, size: int | None = None) -> inference_pb2.Image:
    pixels = bytes(width * height * channels if size is None else size)
    return inference_pb2.Image(raw=inference_pb2.RawImage(width=width, height=height, channels=channels, pixels=pixels))


@pytest.mark.parametrize(
    ("images", "words"),
    [
        ([], "holds no images"),
        ([inference_pb2.Image(data=b"this is not an image at all")], "image 0 (27 bytes) is not a PNG, JPEG"),
        ([inference_pb2.Image(data=FILES["png"][:60])], "image 0 (PNG) cannot be decoded"),
        ([inference_pb2.Image(data=FILES["png"]), inference_pb2.Image()], "image 1 is empty"),
        ([raw(4, 4, 2)], "raw images have 1, 3 or 4 channels, not 2"),
        ([raw(4, 4, 3, size=47)], "raw pixels hold 47 bytes, but width x height x channels = 4 x 4 x 3 = 48"),
        ([raw(0, 4, 3)], "image 0 has no pixels (0 x 4)"),
        ([inference_pb2.Image(data=_png_declaring(100_000, 100_000))], "exceeds limit of"),  # Pillow's words
        ([inference_pb2.Image(data=_png_declaring(10_000, 10_000))], "10000 x 10000 pixels, over the limit"),
    ],
)
def test_bad_images_are_refused_and_the_server_goes_on(fp32_server, images, words):
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ClassifyImage(inference_pb2.ClassifyImageRequest(model=KINDS[0], images=images), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in refused.value.details()
        good = stub.ClassifyImage(
            inference_pb2.ClassifyImageRequest(model=KINDS[0], images=[inference_pb2.Image(data=FILES["png"])]),
            timeout=30,
        )
    assert len(good.results) == 1


def test_other_requests_are_refused_naming_what_the_model_serves(fp32_server):
    with fp32_server.client() as client:
        for call in (
            lambda: client.classify_image(model=KINDS[0], images=[FILES["png"]], candidate_labels=["a cat", "a dog"]),
            lambda: client.classify(model=KINDS[0], texts=["a cat"]),
            lambda: client.tokenize(model=KINDS[0], texts=["a cat"]),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not serve Tokenize; it serves ClassifyImage" in refused.value.details()


def test_the_export_refuses_a_processing_the_server_would_not_reproduce():
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    processing = image_processing(processor)
    assert processing.resample == 3 and processing.height == 32
    processing.resample = 2  # bilinear where the processor resamples bicubic
    with pytest.raises(ExportError, match="cannot reproduce ViTImageProcessor"):
        check_image_processing(processor, processing)
    with pytest.raises(ExportError, match="without cropping"):  # images of many sizes: no batch
        image_processing(CLIPImageProcessor(do_center_crop=False))
