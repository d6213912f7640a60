"""ClassifyImage with candidate_labels at parity with transformers.pipeline(
"zero-shot-image-classification") on a tiny random CLIP and a tiny random SigLIP built here (a
unigram tokenizer and the model's image processor saved beside it), each exported as one graph and
served; and the refusals. For SigLIP the pipeline pads the hypotheses to 64 tokens and scores each
label with a sigmoid; its tokenizer, like SigLIP's own, gives input_ids only."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    pipeline,
)

from tests.checkpoints import _t5_tokenizer
from tests.parity import assert_same_ranking
from tests.test_classify_image import FILES, RAW

KINDS = ["clip-zero-shot", "siglip-zero-shot"]
KIND = KINDS[0]
LABELS = ["a cat", "two dogs", "a red car", "a bowl of soup", "the city at night"]
VISION = {
    "image_size": 30, "patch_size": 6, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 2,
}  # fmt: skip


def _text(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip


def build(directory: Path) -> Path:
    """CLIP. Its text tower pools at the first EOS, which T5's tokenizer appends (id 1: CLIP reads
    an eos_token_id of 2 as an old config and pools at the largest id instead)."""
    tokenizer = _t5_tokenizer()
    text = _text(tokenizer) | {"eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16))
    with torch.no_grad():  # spread the similarities, so that the ranking is no near-tie
        for parameter in (model.text_projection.weight, model.visual_projection.weight):
            parameter.uniform_(-1.0, 1.0)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(directory)
    return directory


def build_siglip(directory: Path) -> Path:
    tokenizer = _t5_tokenizer()
    tokenizer.model_max_length = 64
    tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = ["input_ids"]  # as SigLIP's
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=_text(tokenizer), vision_config=VISION))
    with torch.no_grad():  # scores spread around 0.5 rather than all near 0 (SigLIP's bias starts at -10)
        model.logit_bias.zero_()
        model.logit_scale.fill_(0.0)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(directory)
    return directory


BUILDERS = {"clip-zero-shot": build, "siglip-zero-shot": build_siglip}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    # CLIP's default export is its two towers (tests/test_encode_image.py); here its single graph.
    task = "zero-shot-image-classification"
    return {kind: export(kind, source=BUILDERS[kind](tmp_path_factory.mktemp(kind)), task=task) for kind in KINDS}


@cache
def reference(checkpoint: Path):
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline("zero-shot-image-classification", model=str(checkpoint), image_processor=processor, device="cpu")


def images() -> tuple[list, list[Image.Image]]:
    """What the client sends (encoded files and raw arrays), and the same images as the pipeline takes them."""
    sent = [*FILES.values(), *RAW.values()]
    return sent, [Image.open(io.BytesIO(data)) for data in FILES.values()] + [Image.fromarray(a) for a in RAW.values()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ["", "a blurry picture of {}"])
def test_zero_shot_matches_the_pipeline(fp32_server, exported, kind, template):
    sent, pillows = images()
    with fp32_server.client() as client:
        response = client.classify_image(model=kind, images=sent, candidate_labels=LABELS, hypothesis_template=template)
    options = {"hypothesis_template": template} if template else {}
    expected = reference(exported[kind].checkpoint)(pillows, candidate_labels=LABELS, **options)
    assert len(response) == len(sent) and response.metadata.tokens > 0
    for served, want in zip(response, expected, strict=True):
        assert len(served.labels) == len(LABELS)  # every candidate, as the pipeline
        assert_same_ranking(served, want, 1e-4)
    sums = [sum(x.score for x in r.labels) for r in response]  # a softmax sums to 1; sigmoids need not
    assert all(abs(s - 1) < 1e-4 for s in sums) == (kind == "clip-zero-shot")


def test_top_k_keeps_the_best(fp32_server):
    with fp32_server.client() as client:
        two = client.classify_image(model=KIND, images=[FILES["png"]], candidate_labels=LABELS, top_k=2)
        every = client.classify_image(model=KIND, images=[FILES["png"]], candidate_labels=LABELS)
    assert [x.label for x in two[0].labels] == [x.label for x in every[0].labels[:2]]


@pytest.mark.parametrize("kind", KINDS)
def test_int8_agrees_on_top1(int8_server, exported, kind):
    sent, pillows = images()
    with int8_server.client() as client:
        response = client.classify_image(model=kind, images=sent, candidate_labels=LABELS)
    expected = reference(exported[kind].checkpoint)(pillows, candidate_labels=LABELS)
    assert response.metadata.precision == "int8"
    assert [r.label for r in response] == [want[0]["label"] for want in expected]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({}, "classifies images zero-shot: send the candidate_labels"),
        ({"candidate_labels": LABELS, "hypothesis_template": "a photo"}, "has no {} where the label goes"),
        ({"candidate_labels": LABELS, "images": [b"not an image"]}, "image 0 (12 bytes) is not a PNG"),
    ],
)
def test_bad_requests_are_refused(fp32_server, options, words):
    with fp32_server.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.classify_image(model=KIND, **{"images": [FILES["png"]], **options})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()


def test_the_model_serves_its_tokenizer(fp32_server, exported):
    with fp32_server.client() as client:
        encoding = client.tokenize(model=KIND, texts=["This is a photo of a cat."])[0]
    expected = reference(exported[KIND].checkpoint).tokenizer("This is a photo of a cat.")["input_ids"]
    assert encoding.input_ids == expected
