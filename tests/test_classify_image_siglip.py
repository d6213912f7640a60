"""ClassifyImage with candidate_labels on SigLIP at parity with transformers.pipeline(
"zero-shot-image-classification"), which pads SigLIP's hypotheses to 64 tokens and scores each label
with a sigmoid, on a tiny random SiglipModel built here (a unigram tokenizer that, like SigLIP's,
gives the model input_ids only; a SigLIP image processor), exported by `onnxserve export` with its
task detected, and served."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, SiglipConfig, SiglipImageProcessor, SiglipModel, pipeline

from tests.checkpoints import _t5_tokenizer
from tests.parity import assert_same_ranking
from tests.test_classify_image_zero_shot import LABELS, images

KINDS = ["siglip-zero-shot"]
KIND = KINDS[0]


def build(directory: Path) -> Path:
    tokenizer = _t5_tokenizer()
    tokenizer.model_max_length = 64
    tokenizer.model_input_names = tokenizer.init_kwargs["model_input_names"] = ["input_ids"]  # as SigLIP's
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = {
        "image_size": 30, "patch_size": 6, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }  # fmt: skip
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # scores spread around 0.5 rather than all near 0 (SigLIP's bias starts at -10)
        model.logit_bias.zero_()
        model.logit_scale.fill_(0.0)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {KIND: export(KIND, source=build(tmp_path_factory.mktemp(KIND)))}


@cache
def reference(checkpoint: Path):
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline("zero-shot-image-classification", model=str(checkpoint), image_processor=processor, device="cpu")


@pytest.mark.parametrize("template", ["", "a blurry picture of {}"])
def test_siglip_matches_the_pipeline(fp32_server, exported, template):
    sent, pillows = images()
    with fp32_server.client() as client:
        response = client.classify_image(model=KIND, images=sent, candidate_labels=LABELS, hypothesis_template=template)
    options = {"hypothesis_template": template} if template else {}
    expected = reference(exported[KIND].checkpoint)(pillows, candidate_labels=LABELS, **options)
    for served, want in zip(response, expected, strict=True):
        assert len(served.labels) == len(LABELS)
        assert_same_ranking(served, want, 1e-4)
    assert any(abs(sum(x.score for x in r.labels) - 1) > 0.1 for r in response)  # sigmoids: no softmax's sum of 1


def test_int8_agrees_on_top1(int8_server, exported):
    sent, pillows = images()
    with int8_server.client() as client:
        response = client.classify_image(model=KIND, images=sent, candidate_labels=LABELS)
    expected = reference(exported[KIND].checkpoint)(pillows, candidate_labels=LABELS)
    assert response.metadata.precision == "int8"
    assert [r.label for r in response] == [want[0]["label"] for want in expected]
