"""EncodeImage at parity with transformers on tiny random checkpoints built here: a ViT image
encoder against pipeline("image-feature-extraction"), and CLIP exported as its two towers, whose
image embeddings (EncodeImage) and text embeddings (Encode) equal get_image_features and
get_text_features, and whose cosines equal CLIP's logits_per_image over its logit scale; and the
requests each refuses."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.client import AsyncClient
from onnxserve.export.exporter import export_model
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BitImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)
from transformers.image_utils import load_image  # as the pipelines load images: EXIF orientation, RGB

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.repository import read_manifest
from tests.conftest import Exported
from tests.node_tools import node_client
from tests.parity import assert_same_ranking
from tests.test_classify_image import FILES, RAW
from tests.test_classify_image_zero_shot import build as build_clip
from tests.test_kserve import output

VIT, DINOV2, CLIP = "vit-image-features", "dinov2-image-features", "clip-towers"
KINDS = [VIT, DINOV2, CLIP]
TEXTS = ["a photo of a cat", "two dogs playing on the beach", "a red car", "soup"]


def build_vit(directory: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, architectures=["ViTModel"],
    )  # fmt: skip
    ViTModel(config).eval().save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def build_dinov2(directory: Path) -> Path:
    """DINOv2 with its processor's steps (BitImageProcessor: shortest edge, bicubic, center crop)."""
    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
        architectures=["Dinov2Model"],
    )  # fmt: skip
    Dinov2Model(config).eval().save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Exported]:
    repository = tmp_path_factory.mktemp("encode-image-repository")
    builders = {VIT: build_vit, DINOV2: build_dinov2, CLIP: build_clip}
    sources = {kind: builders[kind](tmp_path_factory.mktemp(kind)) for kind in KINDS}
    done = {}
    for kind, source in sources.items():  # each task detected: CLIP's default export is its two towers
        options = {"name": kind, "precisions": ["fp32"], "show_progress": False}
        version = export_model(source, repository, **options)
        done[kind] = Exported(kind, source, version.parent)
    return done


@cache
def vit_pipeline(checkpoint: Path):
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline("image-feature-extraction", model=str(checkpoint), image_processor=processor, device="cpu")


@cache
def clip(checkpoint: Path) -> tuple[CLIPModel, object, object]:
    model = CLIPModel.from_pretrained(checkpoint).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return model, processor, AutoTokenizer.from_pretrained(checkpoint)


def pillows() -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)) for data in FILES.values()] + [Image.fromarray(a) for a in RAW.values()]


def sent() -> list:
    return [*FILES.values(), *RAW.values()]


def test_clip_is_exported_as_two_towers(exported):
    (variant,) = read_manifest(exported[CLIP].model_dir / "1").variants
    assert sorted(f.role for f in variant.files) == ["text", "vision"] and variant.validation.passed


@pytest.mark.parametrize(("pooling", "pool"), [(None, lambda h: h[0]), ("cls", lambda h: h[0]), ("mean", np.mean)])
def test_vit_embeddings_match_the_pipeline(fp32_server, exported, pooling, pool):
    with fp32_server.client() as client:
        response = client.encode_image(model=VIT, images=sent(), pooling=pooling)
    hidden = [np.array(states[0]) for states in vit_pipeline(exported[VIT].checkpoint)(pillows())]
    expected = np.stack([pool(h) if pool is not np.mean else h.mean(axis=0) for h in hidden])
    assert len(response) == len(hidden) and response.metadata.model == VIT
    np.testing.assert_allclose(np.array(list(response)), expected, atol=1e-4)


def test_dinov2_embeddings_are_the_pipelines_pooled_output(fp32_server, exported):
    """pipeline(pool=True) returns DINOv2's pooler_output: its [CLS] state, the default here."""
    with fp32_server.client() as client:
        response = client.encode_image(model=DINOV2, images=sent())
    expected = [pooled[0] for pooled in vit_pipeline(exported[DINOV2].checkpoint)(pillows(), pool=True)]
    np.testing.assert_allclose(np.array(list(response)), np.array(expected), atol=1e-4)


def test_normalize_scales_to_unit_length(fp32_server):
    with fp32_server.client() as client:
        plain = np.array(list(client.encode_image(model=VIT, images=sent())))
        unit = np.array(list(client.encode_image(model=VIT, images=sent(), normalize=True)))
    np.testing.assert_allclose(unit, plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-6)


def test_clip_towers_match_pytorch_and_share_one_space(fp32_server, exported):
    model, processor, tokenizer = clip(exported[CLIP].checkpoint)
    with fp32_server.client() as client:
        images = np.array(list(client.encode_image(model=CLIP, images=sent())))
        texts = np.array(list(client.encode(model=CLIP, texts=TEXTS)))
    pixels = processor([load_image(image) for image in pillows()], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_images = model.get_image_features(pixel_values=pixels).numpy()
        expected_texts = model.get_text_features(**tokens).numpy()
        logits = model(**tokens, pixel_values=pixels).logits_per_image / model.logit_scale.exp()
    np.testing.assert_allclose(images, expected_images, atol=1e-4)
    np.testing.assert_allclose(texts, expected_texts, atol=1e-4)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(images) @ unit(texts).T, logits.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("model", "call", "words"),
    [
        (CLIP, lambda c: c.encode_image(model=CLIP, images=[FILES["png"]], pooling="mean"), "take no pooling"),
        (CLIP, lambda c: c.encode(model=CLIP, texts=["a cat"], pooling="cls"), "take no pooling"),
        (VIT, lambda c: c.encode(model=VIT, texts=["a cat"]), "encodes images only"),
        (VIT, lambda c: c.encode_image(model=VIT, images=[FILES["png"]], pooling="last_token"), "use CLS or MEAN"),
        (VIT, lambda c: c.encode_image(model=VIT, images=[]), "holds no images"),
        (VIT, lambda c: c.encode_image(model=VIT, images=[b"GIF89a broken"]), "is not a PNG"),
    ],
)
def test_bad_requests_are_refused(fp32_server, model, call, words):
    with fp32_server.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            call(client)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
        assert len(client.encode_image(model=model, images=[FILES["png"]])) == 1  # and the server goes on


def test_the_command_encodes_image_files(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    files = []
    for name in ("png", "jpeg-exif-rotated"):
        files.append(tmp_path / f"{name}.img")
        files[-1].write_bytes(FILES[name])
    main(["encode-image", "--model", CLIP, "--target", fp32_server.target, "--json", "--normalize", *map(str, files)])
    printed = json.loads(capsys.readouterr().out)
    with fp32_server.client() as client:
        expected = client.encode_image(model=CLIP, images=files, normalize=True)
    np.testing.assert_allclose(printed["results"], list(expected), rtol=1e-6)


def test_the_node_client_encodes_images(fp32_server, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(FILES["png"])
    script = """
const { OnnxServeClient } = require(".");
const [target, model, file] = process.argv.slice(1);
const client = new OnnxServeClient(target, { timeoutMs: 60000 });
client.encodeImage({ model, images: [{ data: require("fs").readFileSync(file) }], normalize: true })
  .then((response) => process.stdout.write(JSON.stringify(response.embeddings.map((e) => e.values))))
  .finally(() => client.close());
"""
    result = subprocess.run(
        ["node", "-e", script, fp32_server.target, CLIP, str(image)],
        cwd=node_client(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with fp32_server.client() as client:
        expected = client.encode_image(model=CLIP, images=[image], normalize=True)
    np.testing.assert_allclose(json.loads(result.stdout), list(expected), rtol=1e-6)


def test_the_async_client_answers_as_the_blocking_one(fp32_server):
    async def encode():
        async with AsyncClient(fp32_server.target, timeout=60) as client:
            return await client.encode_image(model=VIT, images=[Image.fromarray(RAW["rgb"])], pooling="mean")

    from_async = asyncio.run(encode())
    with fp32_server.client() as client:
        expected = client.encode_image(model=VIT, images=[RAW["rgb"]], pooling="mean")
    assert list(from_async) == list(expected)


@pytest.mark.parametrize("template", ["", "a blurry picture of {}"])
def test_clip_towers_classify_zero_shot_as_the_pipeline(fp32_server, exported, template):
    """One version of two towers serves ClassifyImage with candidate_labels too."""
    labels = ["a cat", "two dogs", "a red car", "a bowl of soup", "the city at night"]
    checkpoint = exported[CLIP].checkpoint
    reference = pipeline(
        "zero-shot-image-classification", model=str(checkpoint), device="cpu",
        image_processor=AutoImageProcessor.from_pretrained(checkpoint, use_fast=False),
    )  # fmt: skip
    options = {"hypothesis_template": template} if template else {}
    with fp32_server.client() as client:
        response = client.classify_image(model=CLIP, images=sent(), candidate_labels=labels, **options)
        with pytest.raises(grpc.RpcError) as refused:
            client.classify_image(model=VIT, images=sent(), candidate_labels=labels)
    assert response.metadata.tokens > 0  # the hypotheses'
    for served, want in zip(response, reference(pillows(), candidate_labels=labels, **options), strict=True):
        assert_same_ranking(served, want, 1e-4)
    assert "encodes images only: ClassifyImage needs a model with a text tower" in refused.value.details()


def test_kserve_text_and_image_inputs_run_the_clip_towers(fp32_server):
    """A BYTES `text` input embeds with the text tower (Encode), an `image` input with the vision tower."""
    request = v2.ModelInferRequest(model_name=CLIP)
    request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)]).contents.bytes_contents.extend(
        text.encode() for text in TEXTS
    )
    images = v2.ModelInferRequest(model_name=CLIP)
    images.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(FILES["png"])
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        texts, image = stub.ModelInfer(request), stub.ModelInfer(images)
    with fp32_server.client() as client:
        encoded = np.array(list(client.encode(model=CLIP, texts=TEXTS)))
        embedded = np.array(list(client.encode_image(model=CLIP, images=[FILES["png"]])))
    np.testing.assert_array_equal(output(texts, "embedding"), encoded)
    np.testing.assert_array_equal(output(image, "embedding"), embedded)
