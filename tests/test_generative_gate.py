"""The generative gate (export/generative_gate.py): its figures agree with transformers on the same
checkpoint, fp32 agrees fully, and a variant that quantization broke is refused, or written
marked as failed under force."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from onnxserve.export.exporter import export_model
from onnxserve.export.generative_gate import BOUNDS, PROMPTS, TEXT, GenerativeGate
from transformers import AutoModelForCausalLM, AutoTokenizer

from onnxserve.repository import read_manifest
from onnxserve.v1 import common_pb2
from tests import generation_reference as reference

KIND = "llama-causal-lm"
NEW_TOKENS = 16
GATE = GenerativeGate(new_tokens=NEW_TOKENS)  # the real models' bounds
OUTLIER = 30.0


@pytest.fixture(scope="module")
def fp32_validation(export) -> object:
    exported = export(KIND, precisions=("fp32",))  # shared with the other fp32 Llama tests
    (variant,) = read_manifest(max(exported.model_dir.iterdir())).variants
    return variant.validation


@pytest.fixture(scope="module")
def outlier_checkpoint(checkpoint, tmp_path_factory) -> Path:
    """The tiny Llama with one outlier weight in every column of its output projection: exact in
    fp32, where it shifts every token's logit alike, but it sets each column's quantization block
    scale, so that int8 rounds the column's other weights coarsely (the outliers weight-only
    quantization is known to fail on)."""
    source, target = checkpoint(KIND), tmp_path_factory.mktemp("outlier")
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.lm_head.weight[:, 0] = OUTLIER
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def test_fp32_agrees_fully_with_transformers(export, fp32_validation):
    source = export(KIND, precisions=("fp32",)).checkpoint
    expected = [reference.generate_ids(source, [prompt], max_new_tokens=64, do_sample=False)[0] for prompt in PROMPTS]
    assert list(fp32_validation.reference_tokens) == [len(tokens) for tokens in expected]
    assert list(fp32_validation.greedy_agreement) == list(fp32_validation.reference_tokens)
    assert fp32_validation.passed


def test_perplexities_are_transformers(export, fp32_validation):
    source = export(KIND, precisions=("fp32",)).checkpoint
    ids = torch.tensor([reference.tokenizer(source)(TEXT)["input_ids"]])
    with torch.no_grad():
        loss = reference.model(source, seq2seq=False)(ids, labels=ids).loss  # mean NLL of the next tokens
    assert fp32_validation.reference_perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert fp32_validation.perplexity == pytest.approx(fp32_validation.reference_perplexity, rel=1e-4)


def test_a_broken_variant_is_refused_and_written_under_force(outlier_checkpoint, tmp_path, caplog):
    gate = r"the int8 variant missed its validation gates over 6 samples: greedy agreement: \d of 6 prompts agree"
    with caplog.at_level(logging.WARNING, logger="onnxserve.export"):
        version_dir = _export(outlier_checkpoint, tmp_path)
    assert re.search(gate + r".*\(common prefixes (\d+/\d+, ){5}\d+/\d+\), below the 50% required", caplog.text)
    assert re.search(r"left out \(force writes it\)", caplog.text)
    (fp32,) = read_manifest(version_dir).variants
    assert fp32.precision == common_pb2.PRECISION_FP32 and fp32.validation.passed
    assert not (version_dir / "model.int8.onnx").exists()

    forced = read_manifest(_export(outlier_checkpoint, tmp_path, force=True))
    fp32, int8 = forced.variants
    assert fp32.validation.passed and not int8.validation.passed
    assert "greedy agreement" in [failure.split(":")[0] for failure in int8.validation.failures]
    full = sum(a == t for a, t in zip(int8.validation.greedy_agreement, int8.validation.reference_tokens, strict=True))
    assert full < BOUNDS["int8"].min_full_agreement * len(PROMPTS)


def _export(source: Path, repository: Path, force: bool = False) -> Path:
    return export_model(
        str(source), repository, name="outlier", precisions=("fp32", "int8"), force=force, generative_gate=GATE,
        show_progress=False,
    )  # fmt: skip
