"""ReconstructImage at parity with the forward of tiny random SimMIM heads built here
(ViTForMaskedImageModeling; SwinForMaskedImageModeling, with a grid of 8 x 8 patches) and exported
with their mask as an input: for masks given as patch indices, as a mask image and drawn at random
from a seed, the reconstruction equals PyTorch's `reconstruction` and the loss its `loss` for each
image alone, within 1e-4; and the bad requests it refuses."""

from __future__ import annotations

import asyncio
import io
import json
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.client import AsyncClient
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForMaskedImageModeling,
    SwinConfig,
    SwinForMaskedImageModeling,
    ViTConfig,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
)
from transformers.image_utils import load_image

from tests.test_classify_image import FILES, RAW

KINDS = ["vit-masked-image-modeling", "swin-masked-image-modeling"]
KIND, SWIN = KINDS
GRID = 4  # ViT: 32 x 32 images in patches of 8
PATCHES = GRID * GRID
GRIDS = {KIND: GRID, SWIN: 8}  # Swin: patches of 4


def build(directory: Path, kind: str = KIND) -> Path:
    torch.manual_seed(0)
    if kind == SWIN:
        config = SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, encoder_stride=8
        )
        model = SwinForMaskedImageModeling(config)
    else:
        config = ViTConfig(
            image_size=32, patch_size=8, encoder_stride=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64,
        )  # fmt: skip
        model = ViTForMaskedImageModeling(config)
    model.eval().save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    sources = {kind: build(tmp_path_factory.mktemp(kind), kind) for kind in KINDS}
    return {kind: export(kind, precisions=("fp32",), source=source) for kind, source in sources.items()}


@cache
def reference(checkpoint: Path):
    model = AutoModelForMaskedImageModeling.from_pretrained(checkpoint).eval()
    return model, AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)


def forward(checkpoint: Path, data: bytes, masked: list[int], patches: int) -> tuple[np.ndarray, float]:
    """PyTorch's reconstruction and loss for one image alone, with these patches masked."""
    model, processor = reference(checkpoint)
    pixels = processor(load_image(Image.open(io.BytesIO(data))), return_tensors="pt")["pixel_values"]
    mask = torch.zeros(1, patches, dtype=torch.bool)
    mask[0, masked] = True
    with torch.no_grad():
        output = model(pixel_values=pixels, bool_masked_pos=mask)
    return output.reconstruction[0].numpy(), float(output.loss)


def assert_matches_pytorch(exported, images: list[bytes], response, kind: str = KIND) -> None:
    for data, result in zip(images, response, strict=True):
        reconstruction, loss = forward(exported[kind].checkpoint, data, result.masked_patches, GRIDS[kind] ** 2)
        assert result.reconstruction.shape == reconstruction.shape == (3, 32, 32)
        np.testing.assert_allclose(result.reconstruction, reconstruction, atol=1e-4)
        assert result.loss == pytest.approx(loss, abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_patch_indices_match_pytorch(fp32_server, exported, kind):
    images = [FILES["png"], FILES["jpeg-exif-rotated"], FILES["png-rgba"]]
    masks = [[0, 5, 6, 15], [1, 2, 3], list(range(GRIDS[kind] ** 2))]
    with fp32_server.client() as client:
        response = client.reconstruct_image(model=kind, images=images, masks=masks)
    assert [r.masked_patches for r in response] == masks
    assert_matches_pytorch(exported, images, response, kind)


def test_swin_takes_a_mask_image_and_random_masks(fp32_server, exported):
    """A bright top half masks Swin's first four rows of 8 patches; random masks take 0.6 of 64."""
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:20] = 255
    with fp32_server.client() as client:
        drawn = client.reconstruct_image(model=SWIN, images=[FILES["jpeg"]], masks=[mask])
        random = client.reconstruct_image(model=SWIN, images=[FILES["webp"]], seed=1)
    assert drawn[0].masked_patches == list(range(32)) and len(random[0].masked_patches) == round(0.6 * 64)
    assert_matches_pytorch(exported, [FILES["jpeg"]], drawn, SWIN)
    assert_matches_pytorch(exported, [FILES["webp"]], random, SWIN)


def test_a_mask_image_masks_its_bright_patches(fp32_server, exported):
    """The left half white: at the model's input size, the first two columns of patches."""
    mask = np.zeros((50, 50), dtype=np.uint8)
    mask[:, :25] = 255
    images = [FILES["jpeg"], FILES["webp"]]
    with fp32_server.client() as client:
        response = client.reconstruct_image(model=KIND, images=images, masks=[mask])  # one mask for both
    expected = [row * GRID + column for row in range(GRID) for column in (0, 1)]
    assert [r.masked_patches for r in response] == [expected, expected]
    assert_matches_pytorch(exported, images, response)


def test_random_masks_follow_the_seed_and_ratio(fp32_server, exported):
    images = [FILES["png"], FILES["bmp"]]
    with fp32_server.client() as client:
        first = client.reconstruct_image(model=KIND, images=images, seed=7)
        again = client.reconstruct_image(model=KIND, images=images, seed=7)
        other = client.reconstruct_image(model=KIND, images=images, seed=8, mask_ratio=0.25)
    assert [r.masked_patches for r in first] == [r.masked_patches for r in again]
    assert [len(r.masked_patches) for r in first] == [round(0.6 * PATCHES)] * 2  # SimMIM's default ratio
    assert [len(r.masked_patches) for r in other] == [PATCHES // 4] * 2
    assert first[0].masked_patches != first[1].masked_patches  # each image draws its own
    assert_matches_pytorch(exported, images, first)


def test_the_png_is_the_reconstruction_in_pixels(fp32_server, exported):
    """Normalization (ViT's mean and std of 0.5) and rescaling undone, rounded, clipped."""
    with fp32_server.client() as client:
        (result,) = client.reconstruct_image(model=KIND, images=[RAW["rgb"]], masks=[[3, 4]])
    png = Image.open(io.BytesIO(result.image))
    expected = np.clip(np.rint((result.reconstruction.transpose(1, 2, 0) * 0.5 + 0.5) * 255), 0, 255)
    assert png.format == "PNG" and png.size == (32, 32) and png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), expected.astype(np.uint8))


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"images": []}, "holds no images"),
        ({"masks": [[1], [2]]}, "2 masks for 3 images"),
        ({"masks": [[0, PATCHES]]}, f"patch {PATCHES} is outside the model's 4 x 4 grid"),
        ({"masks": [b"not an image"]}, "mask 0: image 0 (12 bytes) is not a PNG"),
        ({"mask_ratio": 1.5}, "mask_ratio 1.5 is not between 0 and 1"),
        ({"images": [b"\x89PNG broken"] * 3}, "image 0 (11 bytes) is not a PNG"),
    ],
)
def test_bad_requests_are_refused(fp32_server, options, words):
    with fp32_server.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.reconstruct_image(model=KIND, **{"images": [FILES["png"]] * 3, **options})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
        assert len(client.reconstruct_image(model=KIND, images=[FILES["png"]])) == 1  # and the server goes on


def test_the_command_reconstructs_image_files(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    image = tmp_path / "photo.png"
    image.write_bytes(FILES["png"])
    command = ["reconstruct", "--model", KIND, "--target", fp32_server.target]
    main([*command, "--json", "--patches", "0,5,6", "--output", str(tmp_path / "out"), str(image)])
    (printed,) = json.loads(capsys.readouterr().out)
    with fp32_server.client() as client:
        (expected,) = client.reconstruct_image(model=KIND, images=[image], masks=[[0, 5, 6]])
    assert printed["masked_patches"] == [0, 5, 6] and printed["loss"] == pytest.approx(expected.loss)
    assert (tmp_path / "out" / "photo.reconstruction.png").read_bytes() == expected.image
    with pytest.raises(SystemExit) as failed:
        main([*command, "--patches", "0,x", str(image)])
    assert failed.value.code == 2 and "not a comma-separated list" in capsys.readouterr().err


def test_the_async_client_answers_as_the_blocking_one(fp32_server):
    async def reconstruct():
        async with AsyncClient(fp32_server.target, timeout=60) as client:
            return await client.reconstruct_image(model=KIND, images=[RAW["rgba"]], masks=[[1, 2, 9]])

    (from_async,) = asyncio.run(reconstruct())
    with fp32_server.client() as client:
        (expected,) = client.reconstruct_image(model=KIND, images=[RAW["rgba"]], masks=[[1, 2, 9]])
    assert from_async.masked_patches == [1, 2, 9] and from_async.image == expected.image
    np.testing.assert_array_equal(from_async.reconstruction, expected.reconstruction)


def test_a_request_whose_answer_cannot_fit_is_refused_upfront(exported, start_server):
    """Each answer holds at least the reconstruction's 3 x 32 x 32 float32s (12288 bytes)."""
    server = start_server(exported, settings={"max_send_message_bytes": 30_000})
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.reconstruct_image(model=KIND, images=[FILES["png"]] * 3)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at least 36864 bytes (12288 per input)" in refused.value.details()
        assert "send at most 2 per call" in refused.value.details()
        assert len(client.reconstruct_image(model=KIND, images=[FILES["png"]] * 2)) == 2
