"""A GGUF's quantized tensors carried into the fused decoder graph exactly (export/gguf_weights.py,
issue 17): a tiny GGUF written by the `gguf` package, one tensor per block type (quantized by the
package where it can, random raw blocks for the K-quants it cannot make), imported into a graph of
MatMuls and an embedding Gather named as the fused decoder graph names them. Decoded from the
written graph's own initializers by the ops' documented formulas, every weight equals what
`gguf.quants.dequantize` gives bit for bit; ONNX Runtime runs the graph to those weights, giving
a row the same bits alone as beside batchmates here and on an emulated AVX2-only CPU; and a tiny
Llama exported from a quantized GGUF at int4 imports every block and keeps PyTorch's
perplexity within 0.5%."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxserve.export.exporter import export_model
from onnxserve.export.generative_gate import BOUNDS, PROMPTS, Bounds, GenerativeGate
from onnxserve.export.gguf_weights import import_gguf_weights
from onnxserve.export.weight_only import RECIPES
from onnxserve.server.quality.gates import GGUF_BOUNDS
from onnxserve.server.quality.probes import PROBES_FILE, read_probes

from onnxserve.repository import read_manifest
from onnxserve.v1 import common_pb2
from tests.conftest import Exported
from tests.emulation import needs_qemu, run_script_on_haswell
from tests.row_bits import first_row_alone_and_beside
from tests.test_export import _write_llama_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

K = 512  # two K-quant super-blocks per row
ROOT = Path(__file__).resolve().parents[1]
ROWS = 24
VOCAB = 40
# Graph weight -> (GGUF tensor, type), every block type the importer knows.
TENSORS = {
    "layers.0.attn.q_proj.weight": ("blk.0.attn_q.weight", T.Q8_0),
    "layers.0.attn.k_proj.weight": ("blk.0.attn_k.weight", T.Q5_0),
    "layers.0.attn.v_proj.weight": ("blk.0.attn_v.weight", T.Q4_0),
    "layers.0.attn.o_proj.weight": ("blk.0.attn_output.weight", T.Q4_K),
    "layers.0.mlp.gate_proj.weight": ("blk.0.ffn_gate.weight", T.Q5_K),
    "layers.0.mlp.up_proj.weight": ("blk.0.ffn_up.weight", T.Q4_1),
    "layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", T.Q6_K),
    "layers.1.attn.q_proj.weight": ("blk.1.attn_q.weight", T.Q5_1),
}
MINS = {T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K}  # `d * q - m` types: m need be no multiple of d
# Where the fp16 block scales (d, and dmin for Q4_K/Q5_K) sit in the K-quants' raw blocks.
K_QUANT_SCALES = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _blocks(kind: T, rows: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` rows of K values in `kind`: quantized by the gguf package where it can, else random
    raw blocks with sane fp16 scales (random bytes there could be infinities or NaNs)."""
    try:
        return quantize(rng.standard_normal((rows, K)).astype(np.float32), kind)
    except NotImplementedError:
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        blocks = rng.integers(0, 256, (rows * K // block_size, type_size), dtype=np.uint8)
        for offset in K_QUANT_SCALES[kind]:
            scales = rng.uniform(1e-3, 2e-2, len(blocks)).astype(np.float16)
            blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, -1)


def _write_gguf(path: Path, embedding: T, seed: int = 0) -> dict[str, np.ndarray]:
    """The GGUF file, and each tensor's values as the gguf package dequantizes them."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for name, kind in [*TENSORS.values(), ("token_embd.weight", embedding)]:
        rows = VOCAB if name == "token_embd.weight" else ROWS
        data = _blocks(kind, rows, rng)
        writer.add_tensor(name, data, raw_dtype=kind)
        values[name] = dequantize(data, kind).reshape(rows, K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def _fp32_graph(path: Path, values: dict[str, np.ndarray]) -> None:
    """Token ids -> embedding rows, and x -> every MatMul of TENSORS and a head tied to the
    embedding, named and laid out as export/decoder_graph.py does (MatMul weights as [K, N])."""
    weights = {graph: values[name].T for graph, (name, _) in TENSORS.items()}
    weights["lm_head.weight"] = values["token_embd.weight"].T
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), n) for n, v in weights.items()]
    inits.append(numpy_helper.from_array(values["token_embd.weight"], "embed_tokens.weight"))
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["embedded"], name="embed_tokens")]
    outputs = ["embedded"]
    for name in weights:
        module = name.removesuffix(".weight")
        nodes.append(helper.make_node("MatMul", ["x", name], [module], name=f"{module}/MatMul"))
        outputs.append(module)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "sequence", K]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))


@pytest.fixture(scope="module", params=[T.Q8_0, T.Q4_0, T.Q4_K], ids=lambda kind: f"embedding-{kind.name}")
def imported(request, tmp_path_factory) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    values = _write_gguf(folder / "tiny.gguf", request.param)
    _fp32_graph(folder / "fp32.onnx", values)
    recipe = import_gguf_weights(folder / "fp32.onnx", folder / "int4.onnx", folder / "tiny.gguf", RECIPES["int4"])
    return onnx.load(str(folder / "int4.onnx")), values, recipe, folder / "int4.onnx"


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' bit packing undone: 4-bit codes two a byte, the first in the low nibble."""
    if bits == 8:
        return codes
    return np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)


def _matmulnbits_weight(model: onnx.ModelProto, output: str) -> np.ndarray:
    """The [N, K] weight a MatMulNBits (plus its remainder MatMul, if any) multiplies with, from
    the written initializers by the op's formula (code - zero_point) * scale, in float64."""
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    node, remainders = producers[output], 0.0
    if node.op_type == "Sub":  # MatMulNBits - block sums @ remainders
        node, correction = producers[node.input[0]], producers[node.input[1]]
        remainders = inits[correction.input[1]].T[..., None].astype(np.float64)
    while node.op_type != "MatMulNBits":  # a 4-bit node's spare row (export/single_rows.py) around it
        node = producers[node.input[0]]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, n, k, block = attributes["bits"], attributes["N"], attributes["K"], attributes["block_size"]
    codes = _unpack(inits[node.input[1]], bits).reshape(n, k // block, block)
    zero_points = _unpack(inits[node.input[3]], bits)[:, : k // block]
    scales = inits[node.input[2]].reshape(n, k // block, 1).astype(np.float64)
    weight = (codes.astype(np.float64) - zero_points[..., None]) * scales - remainders
    return weight.astype(np.float32).reshape(n, k)


def _embedding_table(model: onnx.ModelProto) -> np.ndarray:
    """The [vocab, hidden] table GatherBlockQuantized (less its gathered remainders) reads from."""
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    (node,) = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    bits = helper.get_attribute_value(next(a for a in node.attribute if a.name == "bits"))
    codes = _unpack(inits[node.input[0]], bits).astype(np.float64)
    zero_points = inits[node.input[3]].astype(np.float64)
    table = (codes - zero_points) * inits[node.input[2]]
    remainders = [node for node in model.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids"]
    if remainders:
        table = table - inits[remainders[0].input[0]]
    return table.astype(np.float32).reshape(len(codes), -1)


def test_every_weight_dequantizes_to_the_gguf_packages_values(imported):
    model, values, _, _ = imported
    for graph_name, (gguf_name, kind) in TENSORS.items():
        weight = _matmulnbits_weight(model, graph_name.removesuffix(".weight"))
        assert np.array_equal(weight, values[gguf_name]), kind.name
    assert np.array_equal(_matmulnbits_weight(model, "lm_head"), values["token_embd.weight"])
    assert np.array_equal(_embedding_table(model), values["token_embd.weight"])


def test_no_fp32_weight_is_left(imported):
    model, _, recipe, _ = imported
    embedding = T[recipe.split("embedding ")[1].split(" ")[0]]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == len(TENSORS) + 1 and "GatherBlockQuantized" in ops
    weights = {init.name for init in model.graph.initializer}
    plain = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    # Only the remainder MatMuls of types with mins stay fp32 (a tied head's too).
    with_mins = [kind for _, kind in [*TENSORS.values(), (None, embedding)] if kind in MINS]
    assert all(name.endswith("/Remainders") for name in plain) and len(plain) == len(with_mins)
    for kind in ("Q8_0 as 8-bit", "Q5_0 as 8-bit", "Q4_0 as 4-bit", "Q4_K as 4-bit", "Q6_K as 8-bit"):
        assert kind in recipe
    assert "requantized" not in recipe
    # The tied head and the embedding share their codes.
    nbits = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    (gather,) = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    assert gather.input[0] in {node.input[1] for node in nbits}


def test_onnx_runtime_multiplies_with_those_weights(imported):
    """One-hot inputs pick each weight's rows: int8 activation rounding at accuracy_level 4 is
    exact on them, so the outputs are the weights up to the float rounding of the scales' products."""
    _, values, _, path = imported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.arange(VOCAB)[None], "x": np.eye(K, dtype=np.float32)[None]}
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds), strict=True))
    np.testing.assert_array_equal(outputs["embedded"][0], values["token_embd.weight"])
    weights = {graph: values[name] for graph, (name, _) in TENSORS.items()}
    weights["lm_head.weight"] = values["token_embd.weight"]
    for graph_name, weight in weights.items():
        scale = np.abs(weight).max()
        np.testing.assert_allclose(outputs[graph_name.removesuffix(".weight")][0], weight.T, rtol=0, atol=1e-6 * scale)


def _differing_outputs(rows: dict[str, np.ndarray]) -> list[str]:
    outputs = [name.removeprefix("alone_") for name in rows if name.startswith("alone_")]
    return [name for name in outputs if not np.array_equal(rows[f"alone_{name}"], rows[f"beside_{name}"])]


def test_a_row_gets_the_same_bits_alone_as_beside_batchmates(imported):
    """Every block type gives a row the same bits alone as in a batch: the 8-bit kernel does at any
    number of rows, and the 4-bit nodes run a spare row of their own (ONNX Runtime 1.31's 4-bit
    kernel takes a path of its own for a lone row on AVX2 CPUs), so the server need not pad lone
    decode steps."""
    _, _, _, path = imported
    assert _differing_outputs(first_row_alone_and_beside(str(path), K, skip=("embedded",))) == []


_ROWS_ON_HASWELL = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests.row_bits import first_row_alone_and_beside
results = first_row_alone_and_beside(sys.argv[2], int(sys.argv[3]), skip=("embedded",))
"""


@needs_qemu
def test_on_an_avx2_only_cpu_a_row_gets_the_same_bits_alone_as_beside_batchmates(imported, tmp_path):
    """The same on an emulated AVX2-only CPU, whatever CPU runs the tests: there the 4-bit kernel's
    lone-row path differs, so this fails for the 4-bit types without their spare row."""
    _, _, _, path = imported
    rows = run_script_on_haswell(_ROWS_ON_HASWELL, [str(ROOT), str(path), str(K)], tmp_path)
    assert _differing_outputs(rows) == []


def test_a_quantized_llama_gguf_exports_its_own_blocks(checkpoint, tmp_path, start_server):
    """A tiny Llama's GGUF with block types mixed as llama.cpp mixes them (its q and k rows
    permuted, as llama.cpp's converter writes them): the int4 variant takes every tensor from the
    file's blocks, and being the reference's weights it keeps PyTorch's perplexity but for
    activation rounding."""
    types = {
        "token_embd": T.Q8_0, "output": T.Q8_0, "attn_q": T.Q5_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0,
        "attn_output": T.Q4_1, "ffn_gate": T.Q4_0, "ffn_up": T.Q4_0, "ffn_down": T.Q5_1,
    }  # fmt: skip
    gguf_file = tmp_path / "tiny-llama.Q4_mixed.gguf"
    _write_llama_gguf(checkpoint("llama-causal-lm"), gguf_file, types)
    gate = GenerativeGate(new_tokens=16, bounds={**BOUNDS, "int4": Bounds(0.0, 0.5)})
    version = export_model(
        str(gguf_file), tmp_path / "repository", precisions=("fp32", "int4"), generative_gate=gate, show_progress=False
    )
    variants = {common_pb2.Precision.Name(v.precision): v for v in read_manifest(version).variants}
    recipe = variants["PRECISION_INT4"].recipe
    layers = 2
    counts = {"Q5_0 as 8-bit": 2 * layers, "Q4_0 as 4-bit": 2 * layers, "Q8_0 as 8-bit": layers + 1}
    for kind, count in {**counts, "Q4_1 as 4-bit": layers, "Q5_1 as 8-bit": layers}.items():
        assert f"{count} {kind}" in recipe, recipe
    assert "requantized" not in recipe and "embedding Q8_0 as 8-bit as GatherBlockQuantized" in recipe
    figures = variants["PRECISION_INT4"].validation
    change = figures.perplexity / figures.reference_perplexity - 1
    print(f"\nexact int4 from the GGUF: perplexity {figures.perplexity:.4f} vs {figures.reference_perplexity:.4f}")
    assert abs(change) < 0.005, change
    # Served, each prompt decodes the same alone as in a batch (the remainders' block sums too).
    exported = Exported("tiny", gguf_file, version.parent)
    with start_server({"tiny": exported}, precision="int4", intra_op_threads=1).client() as client:
        alone = [client.generate(model="tiny", prompts=[p], max_new_tokens=16)[0].token_ids for p in PROMPTS]
        batched = client.generate(model="tiny", prompts=list(PROMPTS), max_new_tokens=16)
    assert [result.token_ids for result in batched] == alone


def test_a_gguf_export_is_gated_by_the_exact_imports_bounds(checkpoint, tmp_path):
    """With the default gate, a GGUF's weight-only variants are held to GGUF_BOUNDS (and so are
    they at load: the probes carry them); a tiny random model misses them, so `force` writes it.
    Its F32 tensors (all but two kinds here) get the int4 recipe, mixed as it is, the embedding and
    head included."""
    gguf_file = tmp_path / "tiny-llama.Q8_0.gguf"
    _write_llama_gguf(checkpoint("llama-causal-lm"), gguf_file, {"attn_q": T.Q8_0, "ffn_up": T.Q8_0})
    version = export_model(
        str(gguf_file), tmp_path / "repository", precisions=("fp32", "int4"), force=True, show_progress=False
    )
    assert read_probes(version / PROBES_FILE).bounds == GGUF_BOUNDS
    (int4,) = [v for v in read_manifest(version).variants if v.precision == common_pb2.PRECISION_INT4]
    assert "4 Q8_0 as 8-bit" in int4.recipe
    # The int4 recipe's mix: the head, and attention v and MLP down in the last of 2 layers at 8 bits.
    assert "the rest requantized: 12 by weight-only int4, blocks of 32 (3 of them at 8 bits)" in int4.recipe
