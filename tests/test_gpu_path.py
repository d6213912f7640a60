"""The GPU path, proven where a CPU can prove it (docs/gpu.md):

- the fp16 variant keeps a decoder's KV cache in fp16 (inputs and outputs, no Cast around the
  attention), and its greedy ids on the serving side's shared buffers still equal generate();
- an fp16 optimum decoder (GPT-2) keeps its cache in fp16 too and passes its gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnxserve.export.decoder_graph import build_decoder_graph
from onnxserve.export.optimize import KV_CACHE_PREFIXES, to_fp16
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph
from transformers import AutoModelForCausalLM

from onnxserve.repository import read_manifest
from tests import generation_reference as reference
from tests.conftest import Exported

FUSED_KINDS = ["llama-causal-lm", "gemma3-causal-lm"]
NEW_TOKENS = 12
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _io_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}


def _cache_names(graph: onnx.GraphProto) -> set[str]:
    return {name for name in _io_types(graph) if name.startswith(KV_CACHE_PREFIXES)}


def assert_fp16_cache(graph: onnx.GraphProto) -> None:
    """Every cache input and output is float16, the other float I/O float32, and no Cast reads or
    writes a cache tensor (the fp32-cache conversion put one on each, both ways)."""
    types = _io_types(graph)
    cache = _cache_names(graph)
    assert cache and {types[name] for name in cache} == {FLOAT16}
    assert {types[name] for name in types.keys() - cache} <= {FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    assert types.get("logits") == FLOAT
    casts = [node for node in graph.node if node.op_type == "Cast"]
    assert not [node.name for node in casts if cache & {*node.input, *node.output}]


@pytest.fixture(scope="module")
def fp16_fused(checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind's fused graph converted to fp16 as the exporter does."""
    graphs = {}
    for kind in FUSED_KINDS:
        folder = tmp_path_factory.mktemp(kind)
        model = AutoModelForCausalLM.from_pretrained(checkpoint(kind))
        build_decoder_graph(model, folder / "model.fp32.onnx", max_length=64)
        to_fp16(folder / "model.fp32.onnx", folder / "model.fp16.onnx")
        graphs[kind] = folder / "model.fp16.onnx"
    return graphs


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fp16_fused_decoder_keeps_its_kv_cache_in_fp16(fp16_fused: dict[str, Path], kind: str) -> None:
    graph = onnx.load(str(fp16_fused[kind])).graph
    assert_fp16_cache(graph)
    # GroupQueryAttention reads the past and writes the present directly.
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert attention and all(node.input[3].startswith("past_key_values.") for node in attention)
    assert all(node.output[1].startswith("present.") for node in attention)


@pytest.mark.parametrize("cache_device", [None, "cpu"], ids=["numpy", "ortvalue"])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fp16_fused_greedy_ids_equal_generate(
    fp16_fused: dict[str, Path], checkpoint: Callable[[str], Path], kind: str, cache_device: str | None
) -> None:
    """The fp16 cache allocated by the serving side (numpy on the CPU; OrtValues bound by address,
    the CUDA code path) decodes each prompt, batched, as PyTorch fp32 does."""
    path = checkpoint(kind)
    graph = FusedGraph(Session(fp16_fused[kind], SessionSettings(intra_op_threads=1)), cache_device=cache_device)
    assert {past.dtype.__name__ for past in graph.past} == {"float16"}
    tokenize = reference.tokenizer(path)
    prompts = [tokenize(prompt).input_ids for prompt in reference.PROMPTS]
    batch = FusedBatch(graph, rows=len(prompts), length=max(map(len, prompts)) + NEW_TOKENS)
    generated = [batch.prefill(0, prompts).argmax(axis=-1)]
    while len(generated) < NEW_TOKENS:
        generated.append(batch.decode(generated[-1]).argmax(axis=-1))
    ends = set(reference.eos_ids(path, seq2seq=False))
    for row, prompt in enumerate(reference.PROMPTS):
        ids = [int(step[row]) for step in generated]
        ids = ids[: next((i + 1 for i, token in enumerate(ids) if token in ends), len(ids))]
        assert ids == reference.generate_ids(path, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False)[0], prompt


@pytest.fixture(scope="module")
def gpt2_fp16(export: Callable[..., Exported]) -> Path:
    return export("gpt2-causal-lm", precisions=("fp32", "fp16")).model_dir / "1"


def test_fp16_optimum_decoder_keeps_its_kv_cache_in_fp16_and_passes_its_gate(gpt2_fp16: Path) -> None:
    assert_fp16_cache(onnx.load(str(gpt2_fp16 / "model.fp16.onnx")).graph)
    [fp16] = [v for v in read_manifest(gpt2_fp16).variants if v.files[0].path == "model.fp16.onnx"]
    assert fp16.validation.passed, list(fp16.validation.failures)
    assert "fp16 KV cache" in fp16.recipe
