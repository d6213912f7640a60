"""int8 and int4 weight-only decoders (export/weight_only.py): a tiny Llama exported with the causal
LM's default precisions has MatMulNBits graphs (GatherBlockQuantized for the int4 embedding),
carries its gate figures in the manifest, and serves Generate in each precision with the greedy
agreement its manifest states; int4 is refused for an encoder."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnxserve.export.exporter import ExportError, export_model
from onnxserve.export.generative_gate import BOUNDS, PROMPTS, Bounds, GenerativeGate, common_prefix

from onnxserve.repository import read_manifest
from onnxserve.v1 import common_pb2
from tests import generation_reference as reference
from tests.conftest import Exported

KIND = "llama-causal-lm"
NEW_TOKENS = 16
# A tiny random model's logits are nearly tied, so quantized weights change its greedy choices
# within a few tokens: the quantized variants get loose bounds here, fp32 keeps the real one.
LOOSE = Bounds(min_full_agreement=0.0, max_perplexity_change=0.5)
TINY_GATE = GenerativeGate(new_tokens=NEW_TOKENS, bounds={**BOUNDS, "fp16": LOOSE, "int8": LOOSE, "int4": LOOSE})
BITS = {"int8": 8, "int4": 4}


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Exported:
    """Exported with the causal LM's default precisions."""
    source = checkpoint(KIND)
    version = export_model(
        str(source), tmp_path_factory.mktemp("repository"), name=KIND, generative_gate=TINY_GATE, show_progress=False
    )
    return Exported(KIND, source, version.parent)


@pytest.fixture(scope="module")
def version_dir(exported) -> Path:
    return exported.model_dir / "1"


@pytest.fixture(scope="module")
def variants(version_dir) -> dict[str, object]:
    manifest = read_manifest(version_dir)
    return {common_pb2.Precision.Name(v.precision).removeprefix("PRECISION_").lower(): v for v in manifest.variants}


def _graph(version_dir: Path, variant) -> onnx.GraphProto:
    (model_file,) = variant.files
    return onnx.load(str(version_dir / model_file.path)).graph


def test_a_causal_lm_exports_int8_and_int4_by_default(variants):
    # fp16 too, where ONNX Runtime's CPU provider runs it: the gate runs every variant on the CPU.
    assert {"fp32", "int8", "int4"} <= variants.keys()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_matmuls_become_matmulnbits(version_dir, variants, precision):
    """int4 keeps 8 bits for Q4_K_M's sensitive MatMuls: the head, and (of the tiny Llama's two
    layers) the last layer's attention v and MLP down."""
    graph = _graph(version_dir, variants[precision])
    weights = {init.name for init in graph.initializer}
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    sensitive = (
        {"lm_head", "layers.1.attn.v_proj/MatMul", "layers.1.mlp.down_proj/MatMul"} if precision == "int4" else set()
    )
    bits = {
        node.name.removesuffix("_Q4").removesuffix("_Q8"): onnx.helper.get_node_attr_value(node, "bits")
        for node in nbits
    }
    assert nbits and bits == {name: 8 if name in sensitive else BITS[precision] for name in bits}
    assert sensitive <= bits.keys()
    assert not [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    # onnxruntime's quantizer makes 4-bit GatherBlockQuantized only: int8 keeps its embedding fp32.
    embeddings = [node for node in graph.node if node.op_type == "GatherBlockQuantized"]
    assert len(embeddings) == (1 if precision == "int4" else 0)
    assert str(BITS[precision]) in variants[precision].recipe


def test_every_variant_carries_its_gate_figures(variants):
    for precision, variant in variants.items():
        figures = variant.validation
        assert figures.passed, (precision, list(figures.failures))
        assert len(figures.greedy_agreement) == len(figures.reference_tokens) == len(PROMPTS) == figures.samples
        assert all(0 < total <= NEW_TOKENS for total in figures.reference_tokens)
        assert all(a <= t for a, t in zip(figures.greedy_agreement, figures.reference_tokens, strict=True))
        assert figures.perplexity > 1 and figures.reference_perplexity > 1


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_served_greedy_agreement_is_the_manifests(exported, variants, start_server, precision):
    """Each gate prompt served alone: the common prefix of the served tokens with transformers'
    generate() is the figure the manifest states, so the gate measured what the server runs. In
    one batch, each prompt gets the tokens it got alone: the quantized kernels treat rows apart."""
    stated = variants[precision].validation.greedy_agreement
    alone = []
    with start_server({KIND: exported}, precision=precision, intra_op_threads=1).client() as client:
        for prompt, agreement in zip(PROMPTS, stated, strict=True):
            response = client.generate(model=KIND, prompts=[prompt], max_new_tokens=NEW_TOKENS)
            assert response.metadata.precision == precision
            (expected,) = reference.generate_ids(
                exported.checkpoint, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False
            )
            assert common_prefix(response[0].token_ids, expected) == agreement
            alone.append(response[0].token_ids)
        batched = client.generate(model=KIND, prompts=list(PROMPTS), max_new_tokens=NEW_TOKENS)
    assert [result.token_ids for result in batched] == alone


def test_int4_is_refused_for_an_encoder(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="int4 is for text-generation models"):
        export_model(
            str(checkpoint("bert-sequence-classification")), tmp_path, precisions=("fp32", "int4"), show_progress=False
        )
    assert list(tmp_path.iterdir()) == []
