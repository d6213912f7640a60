"""export/quantize.py on a tiny random BERT: integer MatMuls, batch invariance, closeness to fp32,
and the dynamic fallback for graphs with control flow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxserve.export.quantize import quantize_int8

VOCAB = 200
LENGTHS = (3, 17, 9, 30, 1, 12)  # a text of each length; the batch pads them to 30


@pytest.fixture(scope="module")
def int8_and_fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB
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


def _embed(session: ort.InferenceSession, texts: list[np.ndarray]) -> np.ndarray:
    """Mean-pooled, normalised last_hidden_state of a right-padded batch."""
    width = max(len(t) for t in texts)
    ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        ids[row, : len(text)], mask[row, : len(text)] = text, 1
    hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


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


def test_control_flow_falls_back_to_dynamic(tmp_path):
    """A MatMul inside an If branch: the per-token rewrite walks the main graph only."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "w")
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
        [weight],
    )
    source, target = tmp_path / "if.onnx", tmp_path / "if.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), source)
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
