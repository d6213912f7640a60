"""CaptionImage at parity with transformers on tiny random VisionEncoderDecoders (a ViT encoder,
and a GPT-2 decoder, which recomputes its cross-attention at every step, or a TrOCR decoder, whose
cross-attention keys are cached; the BPE tokenizers of tests/checkpoints.py), exported by
`onnxserve export` (task detected from the checkpoint): token ids equal to generate()'s, greedy and beam search, on
images of every format and mode the contract names; text equal to the image-to-text pipeline's;
sampling reproducible; bad images and parameters refused with INVALID_ARGUMENT, after which the
server goes on."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
from functools import cache
from pathlib import Path

import grpc
import pytest
import torch
from onnxserve.client import AsyncClient
from onnxserve.server.tasks.generation import seq2seq
from onnxserve.server.tasks.generation.cache import DeviceCache, empty_past
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
    pipeline,
)
from transformers.image_utils import load_image

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.node_tools import node_client
from tests.test_classify_image import FILES, RAW
from tests.test_kserve import output

KIND, TROCR = "vit-gpt2-image-to-text", "vit-trocr-image-to-text"
KINDS = [KIND, TROCR]
NEW_TOKENS = 12
POSITIONS = 64  # the decoders': CaptionImage may generate 63 tokens after the start token
# Images of every format and mode, and sizes from 5 x 7 to 640 x 480 (all resized to 32 x 32).
CAPTIONED = ["png", "jpeg", "png-rgba", "png-grayscale", "png-palette", "png-5x7", "gif-first-frame", "large-jpeg"]


def _gpt2(tokenizer: PreTrainedTokenizerBase) -> tuple[PretrainedConfig, dict[str, int]]:
    """GPT-2 with cross-attention; its large initializer range makes greedy outputs vary
    (tests/checkpoints.py). Generation starts from <|endoftext|>, as
    nlpconnect/vit-gpt2-image-captioning's does."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        initializer_range=0.4, add_cross_attention=True, is_decoder=True,
    )  # fmt: skip
    return config, {"decoder_start_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.eos_token_id}


def _trocr(tokenizer: PreTrainedTokenizerBase) -> tuple[PretrainedConfig, dict[str, int]]:
    """TrOCR's decoder (RoBERTa's vocabulary, learned positions); generation starts from </s>, as
    microsoft/trocr-base-printed's does."""
    config = TrOCRConfig(
        vocab_size=len(tokenizer), d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_position_embeddings=POSITIONS, init_std=0.2, use_learned_position_embeddings=True,
        layernorm_embedding=True, cross_attention_hidden_size=32,
    )  # fmt: skip
    return config, {"decoder_start_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


DECODERS = {KIND: _gpt2, TROCR: _trocr}
TOKENIZERS = {KIND: "gpt2-causal-lm", TROCR: "bart-seq2seq"}  # the tests/checkpoints.py kinds that have them


def build(kind: str, directory: Path, tokenizer_source: Path) -> Path:
    """ViT (32 x 32 images, 16 patches) into the kind's decoder, with the processor's config."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    encoder = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    decoder, start = DECODERS[kind](tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    for name, value in special.items():
        setattr(decoder, name, value)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    for name, value in (special | start).items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config).eval()
    model.generation_config = GenerationConfig(**special, **start)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export, checkpoint):
    sources = {kind: build(kind, tmp_path_factory.mktemp(kind), checkpoint(TOKENIZERS[kind])) for kind in KINDS}
    return {kind: export(kind, source=source) for kind, source in sources.items()}


@cache
def model(checkpoint: Path) -> VisionEncoderDecoderModel:
    return VisionEncoderDecoderModel.from_pretrained(checkpoint).eval()


def generate_ids(checkpoint: Path, images: list[Image.Image], **settings) -> list[list[int]]:
    """generate()'s new tokens per image, each cut after its first EOS, on the images as the
    pipeline loads them (EXIF orientation, RGB) and its (slow) image processor makes them."""
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    pixel_values = processor([load_image(image) for image in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(checkpoint).generate(pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False, **settings)
    eos = model(checkpoint).generation_config.eos_token_id
    results = []
    for row in output[:, 1:].tolist():  # after the decoder start token
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


def opened(names: list[str]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(FILES[name])) for name in names]


@pytest.mark.parametrize("kind", KINDS)
def test_the_export_detects_the_task_and_ships_tokenizer_and_image_processing(exported, kind):
    version = max(int(p.name) for p in exported[kind].model_dir.iterdir() if p.name.isdigit())
    manifest = json.loads((exported[kind].model_dir / str(version) / "manifest.json").read_text())
    assert manifest["task"] == "TASK_IMAGE_TO_TEXT"
    assert manifest["image_processing"]["height"] == 32
    assert manifest["generation"]["max_length"] == POSITIONS  # the decoder's positions, not the tokenizer's 256
    assert {v["precision"] for v in manifest["variants"]} == {"PRECISION_FP32", "PRECISION_INT8"}
    assert all(v["validation"]["passed"] for v in manifest["variants"])


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_generate_and_the_pipeline(client, exported, kind):
    checkpoint_dir = exported[kind].checkpoint
    images = [FILES[name] for name in CAPTIONED]
    response = client.caption_image(model=kind, images=images, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in response] == generate_ids(checkpoint_dir, opened(CAPTIONED))
    captioner = pipeline(
        "image-to-text",
        model=str(checkpoint_dir),
        image_processor=AutoImageProcessor.from_pretrained(checkpoint_dir, use_fast=False),
        device="cpu",
    )
    expected = captioner(opened(CAPTIONED), max_new_tokens=NEW_TOKENS)
    assert [r.generated_text for r in response] == [e[0]["generated_text"] for e in expected]
    assert len({tuple(r.token_ids) for r in response}) > 1  # captions differ by image
    assert all(len(set(r.token_ids)) > 3 for r in response)  # and within one: the comparison means something
    for result in response:
        assert result.generated_tokens == len(result.token_ids)
        assert result.finish_reason == ("eos" if len(result.token_ids) < NEW_TOKENS else "length")
    assert response.metadata.model == kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "settings",
    [{"num_beams": 3}, {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True, "no_repeat_ngram_size": 2}],
    ids=["beams3", "beams4-long-early-ngram"],
)
def test_beam_search_matches_generate(client, exported, kind, settings):
    names = CAPTIONED[:4]
    response = client.caption_image(
        model=kind, images=[FILES[name] for name in names], max_new_tokens=NEW_TOKENS, **settings
    )
    assert [r.token_ids for r in response] == generate_ids(exported[kind].checkpoint, opened(names), **settings)


def test_raw_pixels_and_pillow_images_match_generate(client, exported):
    images = [Image.fromarray(pixels) for pixels in RAW.values()]
    expected = generate_ids(exported[KIND].checkpoint, images)
    from_arrays = client.caption_image(model=KIND, images=list(RAW.values()), max_new_tokens=NEW_TOKENS)
    from_pillow = client.caption_image(model=KIND, images=images, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in from_arrays] == [r.token_ids for r in from_pillow] == expected


def test_an_image_gets_the_same_caption_alone_and_in_a_batch(client):
    batch = client.caption_image(model=KIND, images=[FILES[name] for name in CAPTIONED], max_new_tokens=NEW_TOKENS)
    alone = client.caption_image(model=KIND, images=[FILES[CAPTIONED[2]]], max_new_tokens=NEW_TOKENS)
    assert alone[0].token_ids == batch[2].token_ids


def test_sampling_is_reproducible_and_top_k_1_is_greedy(client):
    images = [FILES[name] for name in CAPTIONED[:3]]

    def sample(**options) -> list[list[int]]:
        response = client.caption_image(model=KIND, images=images, max_new_tokens=NEW_TOKENS, do_sample=True, **options)
        return [r.token_ids for r in response]

    assert sample(seed=3, top_k=50) == sample(seed=3, top_k=50)
    assert sample(seed=3, top_k=50) != sample(seed=4, top_k=50)
    greedy = client.caption_image(model=KIND, images=images, max_new_tokens=NEW_TOKENS)
    assert sample(seed=5, top_k=1) == [r.token_ids for r in greedy]


@pytest.mark.parametrize("kind", KINDS)
def test_the_device_cache_path_gives_the_same_tokens(client, monkeypatch, kind):
    """The I/O-binding cache that CUDA uses, run on the CPU: same tokens as the numpy cache."""
    images = [FILES[name] for name in CAPTIONED[:3]]
    host = client.caption_image(model=kind, images=images, max_new_tokens=NEW_TOKENS, num_beams=2)
    monkeypatch.setattr(seq2seq, "new_cache", lambda session, rows: DeviceCache(empty_past(session, rows), "cpu"))
    bound = client.caption_image(model=kind, images=images, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert [r.token_ids for r in bound] == [r.token_ids for r in host]


def test_the_async_client_captions(fp32_server, client):
    async def caption() -> list[list[int]]:
        async with AsyncClient(fp32_server.target) as async_client:
            response = await async_client.caption_image(model=KIND, images=[FILES["png"]], max_new_tokens=NEW_TOKENS)
        return [r.token_ids for r in response]

    expected = client.caption_image(model=KIND, images=[FILES["png"]], max_new_tokens=NEW_TOKENS)
    assert asyncio.run(caption()) == [r.token_ids for r in expected]


def test_kserve_image_input_captions_like_caption_image(fp32_server, client):
    """KServe v2: a BYTES input `image` runs CaptionImage; the request's parameters are its
    GenerationParameters; each caption's fields come back as tensors (token ids padded with -1)."""
    images = [FILES["png"], FILES["jpeg"], FILES["png-5x7"]]
    request = v2.ModelInferRequest(model_name=KIND)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(images)
    request.parameters["max_new_tokens"].int64_param = NEW_TOKENS
    request.parameters["num_beams"].int64_param = 2
    with grpc.insecure_channel(fp32_server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    typed = client.caption_image(model=KIND, images=images, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert output(response, "generated_text").tolist() == [r.generated_text for r in typed]
    token_ids = output(response, "token_ids").tolist()
    assert [[token for token in row if token >= 0] for row in token_ids] == [r.token_ids for r in typed]


# Node: one caption with beams, printed as JSON (argv: target, model, the image in base64).
NODE_CAPTION = """
const { OnnxServeClient } = require(".");
const [target, model, image] = process.argv.slice(1);
const client = new OnnxServeClient(target, { timeoutMs: 60000 });
const parameters = { maxNewTokens: 12, numBeams: 2 };
const request = { model, images: [{ data: Buffer.from(image, "base64") }], parameters };
client.captionImage(request).then((response) => {
  console.log(JSON.stringify(response.results));
  client.close();
});
"""


def test_the_node_client_captions(fp32_server, client):
    image = base64.b64encode(FILES["png"]).decode()
    result = subprocess.run(
        ["node", "-e", NODE_CAPTION, fp32_server.target, KIND, image],
        cwd=node_client(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (caption,) = json.loads(result.stdout)
    (expected,) = client.caption_image(model=KIND, images=[FILES["png"]], max_new_tokens=NEW_TOKENS, num_beams=2)
    assert caption["tokenIds"] == expected.token_ids and caption["generatedText"] == expected.generated_text


def test_int8_captions_and_passed_its_load_check(int8_server):
    with int8_server.client() as client:
        response = client.caption_image(model=KIND, images=[FILES["png"], FILES["jpeg"]], max_new_tokens=NEW_TOKENS)
        info = client.get_model(KIND)
    assert response.metadata.precision == "int8" and info.precision == "int8"
    assert all(r.generated_tokens > 0 for r in response)


def test_the_command_captions_image_files(fp32_server, client, tmp_path, capsys):
    from onnxserve.cli import main

    files = []
    for name in ("png", "jpeg-exif-rotated"):
        files.append(tmp_path / f"{name}.img")
        files[-1].write_bytes(FILES[name])
    command = ["caption", "--model", KIND, "--target", fp32_server.target, "--max-new-tokens", str(NEW_TOKENS)]
    main([*command, "--json", "--num-beams", "2", *map(str, files)])
    printed = json.loads(capsys.readouterr().out)
    expected = client.caption_image(model=KIND, images=files, max_new_tokens=NEW_TOKENS, num_beams=2)
    assert [r["token_ids"] for r in printed["results"]] == [r.token_ids for r in expected]
    assert [r["generated_text"] for r in printed["results"]] == [r.generated_text for r in expected]


@pytest.mark.parametrize(
    ("images", "parameters", "words"),
    [
        ([], {}, "holds no images"),
        ([inference_pb2.Image(data=FILES["png"]), inference_pb2.Image(data=b"not an image")], {}, "image 1 (12 bytes)"),
        ([inference_pb2.Image(data=FILES["jpeg"][:100])], {}, "image 0 (100 bytes) cannot be read: Truncated"),
        ([inference_pb2.Image()], {}, "image 0 is empty"),
        ([inference_pb2.Image(data=FILES["png"])], {"max_new_tokens": POSITIONS}, "at most 63 more tokens"),
        ([inference_pb2.Image(data=FILES["png"])], {"num_beams": 0}, "num_beams must be at least 1"),
    ],
    ids=["no-images", "not-an-image", "truncated", "empty", "too-many-tokens", "no-beams"],
)
def test_bad_requests_are_refused_and_the_server_goes_on(fp32_server, images, parameters, words):
    good = inference_pb2.CaptionImageRequest(model=KIND, images=[inference_pb2.Image(data=FILES["png"])])
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.CaptionImageRequest(
            model=KIND, images=images, parameters=inference_pb2.GenerationParameters(**parameters)
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.CaptionImage(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in refused.value.details()
        assert len(stub.CaptionImage(good, timeout=30).results) == 1


def test_other_requests_are_refused_naming_what_the_model_serves(client):
    with pytest.raises(grpc.RpcError) as refused:
        client.generate(model=KIND, prompts=["a photo of"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "it serves CaptionImage" in refused.value.details()
    (caption,) = client.caption_image(model=KIND, images=[FILES["png"]])
    assert client.detokenize(model=KIND, sequences=[caption.token_ids])[0] == caption.generated_text
