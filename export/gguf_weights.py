"""The weight-only variants of a decoder exported from a GGUF file: the file's own quantized
blocks carried into the fused decoder graph without loss, instead of quantizing transformers'
dequantized copy a second time.

The fp32 graph (export/decoder_graph.py) is built from that dequantized copy. Each of its MatMul
weights that the file holds in a block type becomes a MatMulNBits (com.microsoft) whose codes,
scales and zero points are the file's, and the token embedding a GatherBlockQuantized that shares
its codes with the tied head. A tensor goes in only when the file's values, dequantized by the
`gguf` package, equal the graph's weight bit for bit (its rows matched by value, which undoes
llama.cpp's permutation of Llama's q/k rows); the others, and tensors the file holds as floats,
get the precision's ordinary recipe (export/weight_only.py).

The 4-bit types (Q4_0, Q4_1, Q4_K) go in as 4-bit MatMulNBits codes, the others as 8-bit ones.
ONNX Runtime 1.31's 4-bit kernel computes a lone row (M=1) otherwise than beside batchmates on AVX2
CPUs, so those nodes run one spare row of their own (export/single_rows.py), as the weight-only
recipes' do: a row gets the same bits at any M. 4-bit codes rather than 8-bit ones for these types,
because the 4-bit kernel prefills faster (docs/performance.md).

Every block type here dequantizes, per (sub-)block, as `value = scale * code - offset`, where
MatMulNBits computes `(code - zero_point) * scale` with integer zero points. The offset is split
into the nearest integer zero point and a remainder that fp32 holds exactly; only Q4_K-style mins
(`dmin * m`, no multiple of `d * sc`) leave one, and the graph subtracts it after the MatMulNBits
as (the activation's block sums) @ remainders, the way llama.cpp applies Q4_K's mins. Float zero
points, which the op's schema allows, would hold the offset in one number, but ONNX Runtime 1.31's
CPU kernel does not prepack them and dequantizes the whole weight on every call (docs/int8.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxserve.export.errors import ExportError
from onnxserve.export.optimize import save_model
from onnxserve.export.single_rows import pad_lone_rows
from onnxserve.export.weight_only import WeightOnlyRecipe, quantize_mixed

_MS_DOMAIN = "com.microsoft"
_ACCURACY_LEVEL = 4  # as the weight-only recipes: activations in int8 per block inside the kernel
_EMBEDDING = "embed_tokens.weight"
# Graph weight names (export/decoder_graph.py) -> GGUF tensor names (llama.cpp's).
_LAYER_TENSORS = {
    "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


@dataclass(frozen=True)
class BlockWeight:
    """One GGUF tensor [rows, K] on MatMulNBits' layout, one code a byte (before packing)."""

    gguf_type: str
    bits: int  # MatMulNBits bits holding the codes (4 or 8)
    block_size: int
    codes: np.ndarray  # uint8 [rows, K / block_size, block_size]
    scales: np.ndarray  # float32 [rows, K / block_size]
    zero_points: np.ndarray  # uint8 [rows, K / block_size]
    remainders: np.ndarray  # float32 [rows, K / block_size]: subtracted times each block's input sum

    def dequantize(self) -> np.ndarray:
        """The values the graph multiplies with, [rows, K] float32: MatMulNBits' formula
        `(code - zero_point) * scale`, less the remainders. In float64 every step is exact, so the
        one rounding is to float32's, as in the gguf package's dequantizer."""
        centered = self.codes.astype(np.float64) - self.zero_points[..., None]
        values = centered * self.scales[..., None] - self.remainders[..., None]
        return values.astype(np.float32).reshape(len(self.codes), -1)

    def take_rows(self, rows: np.ndarray) -> BlockWeight:
        return BlockWeight(
            self.gguf_type, self.bits, self.block_size, self.codes[rows], self.scales[rows],
            self.zero_points[rows], self.remainders[rows],
        )  # fmt: skip

    def packed_codes(self) -> np.ndarray:
        """MatMulNBits' B: [rows, blocks, block_size * bits / 8], 4-bit codes two a byte, low first."""
        return _pack(self.codes) if self.bits == 4 else self.codes

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero points: uint8 [rows, ceil(blocks * bits / 8)], packed as B."""
        if self.bits == 8:
            return self.zero_points
        padded = np.pad(self.zero_points, ((0, 0), (0, len(self.zero_points[0]) % 2)))
        return _pack(padded)


def _pack(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# --- reading the file's blocks -------------------------------------------------------------------


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float64)


def _scale_and_offset(d: np.ndarray, zero: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and offsets of `d * (q - zero)` blocks."""
    return d, d * zero


def _scale_and_min(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales and offsets of `d * q + m` blocks."""
    return d, -m


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: `d * sc * q - dmin * m` per sub-block of 32, sc and m packed in 6 bits."""
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    return _fp16(blocks, 0) * sc, _fp16(blocks, 2) * m


def _q6_k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: `d * sc * (q - 32)` per sub-block of 16, sc signed 8-bit after the 6-bit codes."""
    scales = _fp16(blocks, 208) * blocks[:, 192:208].view(np.int8)
    return scales, scales * 32


@dataclass(frozen=True)
class _BlockType:
    bits: int  # MatMulNBits bits that hold the type's codes
    block_size: int  # elements per scale
    fields: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # blocks -> (scales, offsets)


# The gguf package's block layouts (gguf/quants.py): its dequantizers give the values, these the
# per-block scales and offsets, from which the codes follow as (value + offset) / scale.
BLOCK_TYPES = {
    "Q4_0": _BlockType(4, 32, lambda b: _scale_and_offset(_fp16(b, 0), 8)),
    "Q4_1": _BlockType(4, 32, lambda b: _scale_and_min(_fp16(b, 0), _fp16(b, 2))),
    "Q5_0": _BlockType(8, 32, lambda b: _scale_and_offset(_fp16(b, 0), 16)),
    "Q5_1": _BlockType(8, 32, lambda b: _scale_and_min(_fp16(b, 0), _fp16(b, 2))),
    "Q8_0": _BlockType(8, 32, lambda b: _scale_and_offset(_fp16(b, 0), 128)),
    "Q4_K": _BlockType(4, 32, _k_scales),
    "Q5_K": _BlockType(8, 32, _k_scales),
    "Q6_K": _BlockType(8, 16, _q6_k_scales),
}


def block_weight(tensor) -> BlockWeight:
    """A GGUF tensor (gguf.ReaderTensor) of a type in BLOCK_TYPES on MatMulNBits' layout; an
    ExportError if its values do not come out exactly as the gguf package dequantizes them."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    kind = BLOCK_TYPES[tensor.tensor_type.name]
    rows = tensor.data.shape[0]
    values = dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1)
    _, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    scales, offsets = kind.fields(tensor.data.reshape(-1, type_size))
    scales, offsets = scales.reshape(rows, -1), offsets.reshape(rows, -1)
    zero_points, remainders = _zero_points(scales, offsets, kind.bits)
    grouped = values.reshape(*scales.shape, kind.block_size).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(
            scales[..., None] != 0, np.rint((grouped + offsets[..., None]) / scales[..., None]), zero_points[..., None]
        )
    weight = BlockWeight(
        tensor.tensor_type.name, kind.bits, kind.block_size, codes.astype(np.uint8), scales.astype(np.float32),
        zero_points, remainders.astype(np.float32),
    )  # fmt: skip
    if codes.min() < 0 or codes.max() >= 1 << kind.bits or not np.array_equal(weight.dequantize(), values):
        raise ExportError(f"GGUF tensor {tensor.name} ({weight.gguf_type}) does not convert exactly to MatMulNBits")
    return weight


def _zero_points(scales: np.ndarray, offsets: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The integer zero point nearest offset / scale, and the remainder offset - zero point *
    scale; where float32 would round that remainder, zero point 0 and the whole offset."""
    with np.errstate(divide="ignore", invalid="ignore"):
        nearest = np.where(scales != 0, np.clip(np.rint(offsets / scales), 0, (1 << bits) - 1), 0)
    remainders = offsets - nearest * scales
    exact = remainders.astype(np.float32).astype(np.float64) == remainders
    return np.where(exact, nearest, 0).astype(np.uint8), np.where(exact, remainders, offsets)


# --- the graph -----------------------------------------------------------------------------------


def gguf_tensor_name(graph_weight: str) -> str | None:
    """The GGUF tensor that holds a fused-graph weight, by llama.cpp's names; None for others."""
    if graph_weight == _EMBEDDING:
        return "token_embd.weight"
    if graph_weight == "lm_head.weight":
        return "output.weight"
    parts = graph_weight.removesuffix(".weight").split(".", 2)  # layers, index, module
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_TENSORS:
        return f"blk.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    return None


def import_gguf_weights(source: Path, target: Path, gguf_file: Path, recipe: WeightOnlyRecipe) -> str:
    """Writes `source` (the fp32 fused graph of the model in `gguf_file`) with the file's blocks as
    its weights to `target`; the weights it does not hold in blocks by `recipe`. Returns the recipe
    in words."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    model = onnx.load(str(source))
    importer = _Importer(model.graph, {tensor.name: tensor for tensor in reader.tensors})
    importer.run()
    requantized = _quantize_rest(model, recipe, importer.remainder_nodes)
    pad_lone_rows(model)
    save_model(model, target)
    return importer.describe(_file_type(reader), requantized)


def _file_type(reader) -> str:
    from gguf import LlamaFileType

    field = reader.fields.get("general.file_type")
    if field is None:
        return "GGUF"
    return "GGUF " + LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")


class _Importer:
    """Rewrites one graph's MatMul and embedding nodes onto the file's blocks."""

    def __init__(self, graph: onnx.GraphProto, tensors: dict) -> None:
        self.graph = graph
        self.tensors = tensors
        self.weights = {init.name: init for init in graph.initializer}
        self.imported: Counter[str] = Counter()  # "Q4_K as 4-bit" -> MatMuls
        self.embedding: str | None = None
        self.remainder_nodes: list[str] = []  # MatMuls and Gathers of remainders: these stay fp32
        self.block_sums: dict[tuple[str, int], str] = {}
        self.converted: dict[str, BlockWeight] = {}  # GGUF tensor -> its blocks on MatMulNBits' layout
        self.codes: dict[str, str] = {}  # key (see _block_weight) -> its codes' initializer
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.replaced: set[str] = set()  # fp32 weights no longer used

    def run(self) -> None:
        for node in self.graph.node:
            self.nodes.extend(self._rewrite(node) or [node])
        kept = [init for init in self.graph.initializer if init.name not in self.replaced]
        del self.graph.node[:], self.graph.initializer[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(kept + self.initializers)

    def _rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if node.op_type == "MatMul" and node.input[1] in self.weights:
            weight = self._block_weight(node.input[1], transposed=True)
            return weight and self._matmul(node, weight)
        if node.op_type == "Gather" and node.input[0] == _EMBEDDING:
            weight = self._block_weight(node.input[0], transposed=False)
            return weight and self._gather(node, weight)
        return None

    def _block_weight(self, graph_name: str, *, transposed: bool) -> tuple[str, BlockWeight] | None:
        """The file's blocks for a graph weight, rows in the graph's order, if they hold it exactly,
        with the name its codes go by: the GGUF tensor's where its rows are in the file's order
        (so that the embedding and a tied head share them), else the graph weight's."""
        name = gguf_tensor_name(graph_name)
        if name == "output.weight" and name not in self.tensors:
            name = "token_embd.weight"  # tied head
        tensor = self.tensors.get(name)
        if tensor is None or tensor.tensor_type.name not in BLOCK_TYPES:
            return None
        if name not in self.converted:  # the embedding's blocks serve a tied head too
            self.converted[name] = block_weight(tensor)
        weight = self.converted[name]
        expected = numpy_helper.to_array(self.weights[graph_name])
        rows = _matching_rows(weight.dequantize(), expected.T if transposed else expected)
        if rows is None:
            return None
        self.replaced.add(graph_name)
        if np.array_equal(rows, np.arange(len(rows))):
            return name.removesuffix(".weight"), weight
        return graph_name.removesuffix(".weight"), weight.take_rows(rows)

    def _add(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _codes(self, key: str, weight: BlockWeight) -> str:
        """The codes' initializer, one per key: [rows, blocks, bytes] fits MatMulNBits and
        GatherBlockQuantized alike."""
        if key not in self.codes:
            self.codes[key] = self._add(f"{key}.codes", weight.packed_codes())
        return self.codes[key]

    def _matmul(self, node: onnx.NodeProto, imported: tuple[str, BlockWeight]) -> list[onnx.NodeProto]:
        key, weight = imported
        x, name = node.input[0], node.input[1].removesuffix(".weight")
        rows, blocks = weight.scales.shape
        inputs = [
            x,
            self._codes(key, weight),
            self._add(f"{name}.scales", weight.scales),
            self._add(f"{name}.zero_points", weight.packed_zero_points()),
        ]
        self.imported[f"{weight.gguf_type} as {weight.bits}-bit"] += 1
        attributes = dict(K=blocks * weight.block_size, N=rows, bits=weight.bits, block_size=weight.block_size)
        if not weight.remainders.any():
            return [self._node("MatMulNBits", inputs, list(node.output), node.name, **attributes)]
        product = f"{node.name}/MatMulNBits/out"
        correction = f"{node.name}/Remainders"
        self.remainder_nodes.append(correction)
        sums = self._block_sums(x, blocks, weight.block_size)
        remainders = self._add(f"{name}.remainders", weight.remainders.T)
        return [
            self._node("MatMulNBits", inputs, [product], f"{node.name}/MatMulNBits", **attributes),
            helper.make_node("MatMul", [sums, remainders], [f"{correction}/out"], name=correction),
            helper.make_node("Sub", [product, f"{correction}/out"], list(node.output), name=f"{node.name}/Sub"),
        ]

    def _node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attributes) -> onnx.NodeProto:
        if op == "MatMulNBits":
            attributes["accuracy_level"] = _ACCURACY_LEVEL
        return helper.make_node(op, inputs, outputs, name=name, domain=_MS_DOMAIN, **attributes)

    def _block_sums(self, x: str, blocks: int, block_size: int) -> str:
        """x [batch, sequence, K] summed per block of K: [batch, sequence, blocks]; once per input."""
        key = (x, block_size)
        if key not in self.block_sums:
            name = f"{x}/BlockSums{block_size}"
            shape = self._add(f"{name}.shape", np.array([0, 0, blocks, block_size], dtype=np.int64))
            axes = self._add(f"{name}.axes", np.array([-1], dtype=np.int64))
            self.nodes.append(helper.make_node("Reshape", [x, shape], [f"{name}/blocks"], name=f"{name}/Reshape"))
            self.nodes.append(
                helper.make_node("ReduceSum", [f"{name}/blocks", axes], [name], name=f"{name}/ReduceSum", keepdims=0)
            )
            self.block_sums[key] = name
        return self.block_sums[key]

    def _gather(self, node: onnx.NodeProto, imported: tuple[str, BlockWeight]) -> list[onnx.NodeProto]:
        """The embedding as GatherBlockQuantized on [vocab, blocks, bytes] codes (one block per
        row of the last axis), its rows joined again; remainders, if any, gathered and subtracted."""
        key, weight = imported
        hidden = weight.scales.shape[1] * weight.block_size
        codes = self._codes(key, weight)
        self.embedding = f"{weight.gguf_type} as {weight.bits}-bit"
        gathered, ids = f"{node.name}/blocks", node.input[1]
        nodes = [
            self._node(
                "GatherBlockQuantized",
                [codes, ids, self._add("embed_tokens.scales", weight.scales[..., None]),
                 self._add("embed_tokens.zero_points", weight.zero_points[..., None])],
                [gathered], f"{node.name}/GatherBlockQuantized",
                bits=weight.bits, block_size=weight.block_size, gather_axis=0, quantize_axis=2,
            ),
        ]  # fmt: skip
        if weight.remainders.any():
            remainders = self._add("embed_tokens.remainders", weight.remainders[..., None])
            picked, less = f"{gathered}/remainders", f"{gathered}/less"
            nodes.append(helper.make_node("Gather", [remainders, ids], [picked], name=f"{picked}/Gather"))
            self.remainder_nodes.append(f"{picked}/Gather")
            nodes.append(helper.make_node("Sub", [gathered, picked], [less], name=f"{less}/Sub"))
            gathered = less
        shape = self._add("embed_tokens.shape", np.array([0, 0, hidden], dtype=np.int64))
        nodes.append(helper.make_node("Reshape", [gathered, shape], list(node.output), name=f"{node.name}/Reshape"))
        return nodes

    def describe(self, file_type: str, requantized: str | None) -> str:
        parts = [f"{count} {kind}" for kind, count in sorted(self.imported.items(), key=lambda item: -item[1])]
        exact = ", ".join(parts) or "no tensor"
        text = f"{file_type}, exact: {exact} as MatMulNBits (accuracy_level {_ACCURACY_LEVEL})"
        if self.remainder_nodes:
            text += "; mins that are no multiple of the scale subtracted as block sums @ remainders"
        if self.embedding:
            text += f"; embedding {self.embedding} as GatherBlockQuantized, codes shared with a tied head"
        if requantized:
            text += f"; the rest requantized: {requantized}"
        return text


def _matching_rows(values: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
    """Indices such that values[indices] equals expected bit for bit, or None."""
    if values.shape != expected.shape:
        return None
    if np.array_equal(values, expected):
        return np.arange(len(values))
    where = {row.tobytes(): index for index, row in enumerate(values)}
    rows = [where.get(row.tobytes()) for row in expected]
    return None if None in rows else np.array(rows)


def _quantize_rest(model: onnx.ModelProto, recipe: WeightOnlyRecipe, remainder_nodes: list[str]) -> str | None:
    """The MatMuls (and embedding) still on fp32 weights but the remainders', by `recipe`; says
    how many, or None when there are none."""
    weights = {init.name for init in model.graph.initializer}
    rest = [
        node.name for node in model.graph.node
        if node.name not in remainder_nodes and node.input and (
            (node.op_type == "MatMul" and node.input[1] in weights)
            or (node.op_type == "Gather" and recipe.quantize_embedding and node.input[0] in weights)
        )
    ]  # fmt: skip
    if not rest:
        return None
    quantized, sensitive = quantize_mixed(model, recipe, exclude=remainder_nodes)
    model.CopyFrom(quantized)
    text = f"{len(rest)} by weight-only int{recipe.bits}, blocks of {recipe.block_size}"
    return text + (f" ({sensitive} of them at {recipe.sensitive_bits} bits)" if sensitive else "")
