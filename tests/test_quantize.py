"""export/quantize.py on a tiny random BERT: integer MatMuls, batch invariance, closeness to fp32,
the dynamic fallback for graphs with control flow, and the int16 pair-sum bound that makes the
integer GEMMs exact on AVX2 (checked on the graphs, and on a numpy model of vpmaddubsw)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxserve.export.quantize import INT16_MAX, integer_gemm_pair_sums, quantize_int8

from tests.emulation import needs_qemu, run_on_haswell

VOCAB = 200
HIDDEN, INTERMEDIATE = 32, 64
LENGTHS = (3, 17, 9, 30, 1, 12)  # a text of each length; the batch pads them to 30


@pytest.fixture(scope="module")
def int8_and_fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=INTERMEDIATE, vocab_size=VOCAB
    )
    BertModel(config).eval().save_pretrained(folder / "checkpoint")
    main_export(
        str(folder / "checkpoint"), output=folder / "onnx", task="feature-extraction", library_name="transformers"
    )
    fp32, int8 = folder / "onnx" / "model.onnx", folder / "model.int8.onnx"
    return fp32, int8, quantize_int8(fp32, int8)


def _texts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(5, VOCAB, size=length) for length in LENGTHS]


def _feeds(texts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A right-padded batch."""
    width = max(len(t) for t in texts)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        ids[row, : len(text)], mask[row, : len(text)] = text, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _embed(session: ort.InferenceSession, texts: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled, normalised last_hidden_state of a right-padded batch."""
    feeds = _feeds(texts)
    mask = feeds["attention_mask"]
    hidden = session.run(None, feeds)[0]
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@needs_qemu
def test_int8_on_an_emulated_avx2_only_cpu_answers_as_here(int8_and_fp32, tmp_path):
    """The integer GEMMs are exact on AVX2's kernels too: the int8 graph's embeddings on an emulated
    Haswell equal this machine's. (On the real MiniLM the old recipe fails there: test_minilm.)"""
    fp32, int8, _ = int8_and_fp32
    texts = _texts()
    feeds = _feeds(texts)
    hidden = run_on_haswell(int8, feeds, tmp_path)
    mask = feeds["attention_mask"]
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert (pooled * _embed(_session(int8), texts)).sum(axis=1).min() >= 0.99999
    assert (pooled * _embed(_session(fp32), texts)).sum(axis=1).min() >= 0.99


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_weight_matmuls_become_integer(int8_and_fp32):
    _, int8, recipe = int8_and_fp32
    graph = onnx.load(str(int8)).graph
    weights = {init.name for init in graph.initializer}
    ops = [node.op_type for node in graph.node]
    assert recipe.startswith("per-token int8"), recipe
    assert ops.count("MatMulIntegerToFloat") == 12  # query, key, value, output, two FFN per layer
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_a_text_alone_matches_it_inside_a_padded_batch(int8_and_fp32):
    _, int8, _ = int8_and_fp32
    session = _session(int8)
    texts = _texts()
    batched = _embed(session, texts)
    alone = np.concatenate([_embed(session, [text]) for text in texts])
    assert (alone * batched).sum(axis=1).min() >= 0.9999


def test_int8_stays_close_to_fp32(int8_and_fp32):
    fp32, int8, _ = int8_and_fp32
    texts = _texts()
    cosines = (_embed(_session(fp32), texts) * _embed(_session(int8), texts)).sum(axis=1)
    assert cosines.min() >= 0.99


def vpmaddubsw_matmul(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """uint8 [M, K] x int8 [K, N] as ONNX Runtime's AVX2 U8S8 kernel computes it: each two adjacent
    products are added into a saturating int16 (vpmaddubsw), then the pairs into int32."""
    a, w = activations.astype(np.int64), weights.astype(np.int64)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    products = a[:, :, None] * w[None, :, :]
    pairs = products[:, 0::2] + products[:, 1::2]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1)


def _integer_gemms(path: Path) -> list[np.ndarray]:
    """The int8 weight of every integer GEMM in the graph at `path`."""
    model = onnx.load(str(path))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return [initializers[node.input[1]] for node in model.graph.node if node.op_type == "MatMulIntegerToFloat"]


def _per_token_uint8(rows: np.ndarray, zero_point_columns: int) -> np.ndarray:
    """Rows quantized as the graph does (asymmetric uint8 per row), with their zero point repeated."""
    high, low = np.maximum(rows.max(1, keepdims=True), 0), np.maximum(-rows.min(1, keepdims=True), 0)
    scale = (high + low) / 255
    zero_point = np.round(low / scale)
    quantized = np.clip(np.round(rows / scale) + zero_point, 0, 255)
    return np.concatenate([quantized, np.repeat(zero_point, zero_point_columns, axis=1)], axis=1).astype(np.uint8)


def test_every_integer_gemm_fits_int16_pairs(int8_and_fp32, tmp_path):
    """The bound on the written graphs: any uint8 activation times any two adjacent weights fits int16,
    for the per-token recipe and for the dynamic fallback (7-bit weights)."""
    _, int8, _ = int8_and_fp32
    sums = integer_gemm_pair_sums(onnx.load(str(int8)))
    assert len(sums) == 12
    assert max(sums.values()) <= INT16_MAX
    source, target = tmp_path / "if.onnx", tmp_path / "if.int8.onnx"
    onnx.save(_graph_with_if(np.random.default_rng(0).normal(size=(16, 8)) * 5), source)
    quantize_int8(source, target)
    dynamic = integer_gemm_pair_sums(onnx.load(str(target)))
    assert len(dynamic) == 2  # the MatMul of each branch
    assert max(dynamic.values()) <= INT16_MAX


def test_the_avx2_kernel_model_is_exact_on_the_graph_and_clips_full_range_weights(int8_and_fp32):
    """The numpy model of vpmaddubsw against the exact int32 product: every weight of the int8 graph,
    zero-point rows included, meets worst-case and realistic activations without clipping; the same
    fp32 weights quantized to the full int8 range with the old zero-point rows (±127) do clip."""
    fp32, int8, _ = int8_and_fp32
    rng = np.random.default_rng(1)
    for weight in _integer_gemms(int8):
        total = weight.shape[0]
        depth = max(d for d in (HIDDEN, INTERMEDIATE) if d <= total)  # the rest are zero-point rows
        worst = np.full((1, total), 255, np.uint8)
        realistic = _per_token_uint8(rng.normal(-0.5, 1.0, size=(8, depth)), total - depth)  # zero points ~160
        activations = np.concatenate([worst, realistic])
        assert np.array_equal(vpmaddubsw_matmul(activations, weight), activations.astype(np.int64) @ weight)
    reference = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(fp32)).graph.initializer}
    full_range = next(w for w in reference.values() if w.ndim == 2 and w.shape[0] == HIDDEN)
    scales = np.abs(full_range).max(axis=0) / 127
    quantized = np.round(full_range / scales).astype(np.int64)
    sums = -quantized.sum(axis=0)
    rows = -(-np.abs(sums).max() // 127)
    parts = np.diff(np.arange(rows + 1)[:, None] * sums[None, :] // rows, axis=0)
    old = np.concatenate([quantized, parts])
    activations = _per_token_uint8(rng.normal(-0.5, 1.0, size=(8, HIDDEN)), rows)
    assert not np.array_equal(vpmaddubsw_matmul(activations, old), activations.astype(np.int64) @ old)


def _graph_with_if(weight: np.ndarray) -> onnx.ModelProto:
    """A MatMul inside an If branch: the per-token rewrite walks the main graph only."""
    initializer = numpy_helper.from_array(weight.astype(np.float32), "w")
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y_branch"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y_branch", TensorProto.FLOAT, [None, 8])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch)],
        "main",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [initializer],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_control_flow_falls_back_to_dynamic(tmp_path):
    source, target = tmp_path / "if.onnx", tmp_path / "if.int8.onnx"
    onnx.save(_graph_with_if(np.random.default_rng(0).normal(size=(16, 8))), source)
    recipe = quantize_int8(source, target)
    assert recipe.startswith("dynamic int8 (control-flow subgraphs)"), recipe
    x = np.ones((2, 16), dtype=np.float32)
    assert _session(target).run(None, {"x": x, "flag": np.array(True)})[0].shape == (2, 8)


def test_source_with_external_data(int8_and_fp32, tmp_path):
    """Exports past 2 GiB keep their weights in a side file; the quantizer reads them from there."""
    fp32, _, _ = int8_and_fp32
    source, target = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    onnx.save(onnx.load(str(fp32)), source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    assert quantize_int8(source, target).startswith("per-token int8")
    texts = _texts()
    assert (_embed(_session(fp32), texts) * _embed(_session(target), texts)).sum(axis=1).min() >= 0.99
