"""Int8 variants of exported fp32 ONNX models: per-token activations, and integer GEMMs that are
exact on every x86 CPU.

Every MatMul whose weight is a constant 2-D fp32 matrix becomes a MatMulIntegerToFloat
(com.microsoft) times a row scale, fed by
- the weight in int8, symmetric, one scale per output channel (quantized once, here);
- the activation in uint8, asymmetric, one scale and zero point per row (token), computed in the
  graph, so that a row's answer never depends on its batchmates.
MatMulInteger kernels take one zero point for all of A, so the per-row zero point is folded into
the same GEMM: extra activation columns hold the row's zero point and meet extra weight rows that
sum to minus each column's weight sum.

The bound that makes it portable: ONNX Runtime's uint8 x int8 kernels on AVX2, and on AVX-512
without VNNI, add each two adjacent products into a saturating int16 (`vpmaddubsw`), where VNNI and
AMX accumulate in int32. So every weight column is scaled so that any two adjacent int8 weights
sum to at most PAIR_LIMIT in magnitude (255 * 128 = 32,640 fits in int16), the zero-point rows stay
within ZERO_POINT_PART, and a zero row separates them from the weight. `integer_gemm_pair_sums`
checks the bound on the written graph. Recipe choices and their measurements: docs/int8.md.

Graphs with control flow (If/Loop/Scan subgraphs), opset < 13 or no constant-weight MatMul get
ONNX Runtime's per-channel dynamic quantization with 7-bit weights (`reduce_range`), which keeps
the same bound, and the description says so.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import quantize_nparray
from onnxserve.export.optimize import save_model

_MS_DOMAIN = "com.microsoft"
_MIN_OPSET = 13  # QuantizeLinear's per-axis scales
_REDUCE_AXES_AS_INPUT = 18  # ReduceMax/ReduceMin take `axes` as an input from opset 18 on
_UINT8_LEVELS = 255.0
# 255 * (|w_k| + |w_k+1|) must fit in int16 (32,767) wherever vpmaddubsw adds two products: so any
# two adjacent weights sum to at most 128 in magnitude. Scaling to 127 leaves room for rounding.
PAIR_LIMIT = 128
_PAIR_SCALE = 127
ZERO_POINT_PART = PAIR_LIMIT // 2  # two adjacent zero-point rows stay within the pair limit
INT16_MAX = int(np.iinfo(np.int16).max)
_UINT8_MAX = int(np.iinfo(np.uint8).max)
_PREFIX = "per_token_int8"
_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def quantize_int8(source: Path, target: Path) -> str:
    """Writes an int8 variant of the fp32 ONNX model `source` to `target`; returns a one-line
    description of the recipe (recorded in the model manifest)."""
    model = onnx.load(str(source))
    reason = _unsuited(model)
    if reason is None:
        quantized, total = _per_token_rewrite(model)
        if quantized:
            _check_pair_sums(model)
            save_model(model, target)
            return (
                f"per-token int8: {quantized} of {total} MatMuls as MatMulIntegerToFloat, int8 weights "
                f"per output channel with adjacent pairs within ±{PAIR_LIMIT}, uint8 activations with a "
                "scale and zero point per token"
            )
        reason = "no MatMul with a constant 2-D fp32 weight"
    _quantize_dynamic(source, target, large=model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF)
    _check_pair_sums(onnx.load(str(target)))
    return (
        f"dynamic int8 ({reason}): per-channel 7-bit MatMul weights, one uint8 activation scale "
        "per batch tensor (answers depend on batchmates)"
    )


# Integer GEMMs: the input index of their uint8 activation operand (or float, quantized to uint8
# inside the kernel) and of their int8 weight.
_INTEGER_GEMMS = {
    "MatMulInteger": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (0, 1),
    "QLinearMatMul": (0, 3),
}


def integer_gemm_pair_sums(model: onnx.ModelProto) -> dict[str, int]:
    """Each integer GEMM's largest possible pair sum, 255 * (|w_k| + |w_k+1|) over adjacent weight
    rows: what vpmaddubsw computes in int16 on AVX2. Subgraphs (If/Loop branches, where the
    dynamic fallback quantizes) are walked too. A GEMM whose weight is not a constant int8 matrix
    cannot be bounded and raises ValueError, naming it."""
    return _pair_sums(model.graph, {}, "")


def _pair_sums(graph: onnx.GraphProto, outer: dict[str, TensorProto], prefix: str) -> dict[str, int]:
    initializers = {**outer, **{init.name: init for init in graph.initializer}}
    sums = {}
    for node in graph.node:
        for attribute in node.attribute:
            scope = f"{prefix}{node.name or node.output[0]}.{attribute.name}/"
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                sums |= _pair_sums(subgraph, initializers, scope)
        if node.op_type not in _INTEGER_GEMMS:
            continue
        weight = initializers.get(node.input[_INTEGER_GEMMS[node.op_type][1]])
        if weight is None or weight.data_type != TensorProto.INT8:
            raise ValueError(f"{node.op_type} {node.name!r} has no constant int8 weight to bound")
        magnitudes = np.abs(numpy_helper.to_array(weight).astype(np.int64))
        magnitudes = magnitudes.reshape(-1, magnitudes.shape[-1])
        pairs = magnitudes[:-1] + magnitudes[1:] if len(magnitudes) > 1 else magnitudes
        sums[prefix + (node.name or node.output[0])] = _UINT8_MAX * int(pairs.max(initial=0))
    return sums


def _check_pair_sums(model: onnx.ModelProto) -> None:
    over = {name: value for name, value in integer_gemm_pair_sums(model).items() if value > INT16_MAX}
    if over:
        raise AssertionError(f"integer GEMMs whose pair sums overflow int16 on AVX2: {over}")


def _unsuited(model: onnx.ModelProto) -> str | None:
    """Why the per-token rewrite does not apply to `model`, or None."""
    if _opset(model) < _MIN_OPSET:
        return f"opset {_opset(model)} < {_MIN_OPSET}"
    # The rewrite walks the main graph only; subgraphs would keep fp32 MatMuls unnoticed.
    if any(attr.type in _SUBGRAPH_ATTRIBUTES for node in model.graph.node for attr in node.attribute):
        return "control-flow subgraphs"
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _quantize_dynamic(source: Path, target: Path, large: bool) -> None:
    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,  # weights within ±64: pair sums fit in int16 (see PAIR_LIMIT)
        weight_type=QuantType.QInt8,
        use_external_data_format=large,
        extra_options={
            "MatMulConstBOnly": True,
            "EnableSubgraph": True,
            # Shape inference cannot type outputs of contrib ops; those are fp32 in our graphs.
            "DefaultTensorType": TensorProto.FLOAT,
        },
    )


@dataclass(frozen=True)
class _Weight:
    """One MatMul's weight, int8 per output channel."""

    node: onnx.NodeProto
    values: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [N]

    @property
    def zero_point_rows(self) -> int:
        """Extra rows needed: a zero row that keeps the last weight row from pairing with a
        zero-point row, then enough parts within ZERO_POINT_PART for each column to sum to minus its
        column sum."""
        return 1 + max(1, -(-int(np.abs(self.column_sums).max()) // ZERO_POINT_PART))

    @property
    def column_sums(self) -> np.ndarray:
        return self.values.astype(np.int64).sum(axis=0)

    def with_zero_point_rows(self, rows: int) -> np.ndarray:
        """The weight with `rows` int8 rows appended, a zero row and then parts whose column sums are
        minus the weight's: against activation columns that all hold a row's zero point z, they add
        -z * column_sum."""
        total, parts = -self.column_sums, rows - 1
        # floor(total * (j + 1) / parts) - floor(total * j / parts): parts differ by at most one and
        # stay within ZERO_POINT_PART as |total| <= ZERO_POINT_PART * parts.
        steps = np.arange(parts + 1)[:, None] * total[None, :] // parts
        separator = np.zeros((1, self.values.shape[1]), np.int8)
        return np.concatenate([self.values, separator, np.diff(steps, axis=0).astype(np.int8)])


def _per_token_rewrite(model: onnx.ModelProto) -> tuple[int, int]:
    """Rewrites `model` in place; returns (MatMuls quantized, MatMuls in the graph)."""
    graph = model.graph
    total = sum(node.op_type == "MatMul" for node in graph.node)
    weights = _quantizable_weights(graph)
    consumers: dict[str, list[_Weight]] = defaultdict(list)
    for weight in weights:
        consumers[weight.node.input[0]].append(weight)
    builder = _Builder(_opset(model))
    by_node = {id(weight.node): weight for weight in weights}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = by_node.get(id(node))
        if weight is None:
            nodes.append(node)
            continue
        activation = node.input[0]
        rows = max(w.zero_point_rows for w in consumers[activation])
        nodes += builder.quantized_matmul(activation, weight, rows)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(builder.initializers)
    _drop_unused_initializers(graph)
    if not any(entry.domain == _MS_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    return len(weights), total


def _quantizable_weights(graph: onnx.GraphProto) -> list[_Weight]:
    initializers = {init.name: init for init in graph.initializer}
    weights = []
    for node in graph.node:
        init = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is not None and len(init.dims) == 2 and init.data_type == TensorProto.FLOAT:
            weights.append(_quantize_weight(node, numpy_helper.to_array(init)))
    return weights


def _quantize_weight(node: onnx.NodeProto, weight: np.ndarray) -> _Weight:
    """Per output channel, the scale maps the column's largest sum of two adjacent magnitudes to
    _PAIR_SCALE: about one bit finer than 7-bit weights, as a column's peak rarely sits beside
    another large weight."""
    magnitudes = np.abs(weight)
    peak = (magnitudes[:-1] + magnitudes[1:]).max(axis=0) if len(weight) > 1 else magnitudes.max(axis=0)
    scales = np.where(peak > 0, peak / _PAIR_SCALE, 1.0).astype(np.float32)
    return _Weight(node, quantize_nparray(TensorProto.INT8, weight, scales, 0), scales)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


class _Builder:
    """Emits the quantized nodes; each activation is quantized once, for all its MatMuls."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.initializers: list[TensorProto] = []
        self._constants: dict[str, str] = {}
        self._quantized: dict[str, tuple[str, str]] = {}

    def quantized_matmul(self, activation: str, weight: _Weight, rows: int) -> list[onnx.NodeProto]:
        nodes = []
        if activation not in self._quantized:
            nodes += self._quantize_rows(activation, weight.values.shape[0], rows)
        quantized, scale = self._quantized[activation]
        output = weight.node.output[0]
        name = f"{_PREFIX}/{weight.node.name or output}"
        values = self._initializer(f"{name}/weight", weight.with_zero_point_rows(rows))
        scales = self._initializer(f"{name}/weight_scale", weight.scales)
        columns = self._initializer(f"{name}/columns", np.array([weight.values.shape[1]], dtype=np.int64))
        # The row scale is applied by a Mul rather than as MatMulIntegerToFloat's A scale: the kernel
        # scales its output on one thread, a Mul on all of them.
        inputs = [quantized, values, self._constant("one", np.ones(1, np.float32)), scales]
        nodes += [
            helper.make_node("MatMulIntegerToFloat", inputs, [f"{name}/2d"], name=name, domain=_MS_DOMAIN),
            helper.make_node("Mul", [f"{name}/2d", scale], [f"{name}/scaled"]),
        ]
        leading = self._constant("zero_1d", np.zeros(1, np.int64)), self._constant("minus_one", np.array([-1]))
        return [
            *nodes,
            # Back to the activation's leading dimensions, with N columns.
            helper.make_node("Shape", [activation], [f"{name}/activation_shape"]),
            helper.make_node("Slice", [f"{name}/activation_shape", *leading], [f"{name}/leading"]),
            helper.make_node("Concat", [f"{name}/leading", columns], [f"{name}/shape"], axis=0),
            helper.make_node("Reshape", [f"{name}/scaled", f"{name}/shape"], [output]),
        ]

    def _quantize_rows(self, activation: str, depth: int, rows: int) -> list[onnx.NodeProto]:
        """uint8 [tokens, depth + rows] of `activation`: each quantized row, then `rows` copies of its
        zero point; and the row scales [tokens, 1]."""
        name = f"{_PREFIX}/{activation}"
        flat, high, low, scale, zero_point = (f"{name}/{part}" for part in ("2d", "max", "min", "scale", "zp"))
        self._quantized[activation] = (f"{name}/quantized", scale)
        flat_shape = self._initializer(f"{name}/2d_shape", np.array([-1, depth], dtype=np.int64))
        # [1, 1] constants: ONNX Runtime broadcasts a 0-d operand element by element, ten times slower.
        smallest = self._constant("smallest_range", np.full((1, 1), np.finfo(np.float32).tiny * _UINT8_LEVELS))
        per_level = self._constant("per_level", np.full((1, 1), 1 / _UINT8_LEVELS, np.float32))
        minus_one = self._constant("minus_one", np.array([-1]))
        return [
            helper.make_node("Reshape", [activation, flat_shape], [flat]),
            # The range always holds zero, so that zero (padding, ReLU) stays exact.
            self._reduce("ReduceMax", flat, f"{high}/raw"),
            helper.make_node("Relu", [f"{high}/raw"], [high]),
            self._reduce("ReduceMin", flat, f"{low}/raw"),
            helper.make_node("Neg", [f"{low}/raw"], [f"{low}/negated"]),
            helper.make_node("Relu", [f"{low}/negated"], [low]),  # minus the range's low end
            helper.make_node("Add", [high, low], [f"{scale}/range"]),
            # An all-zero row gets a tiny positive scale rather than a division by zero.
            helper.make_node("Max", [f"{scale}/range", smallest], [f"{scale}/nonzero"]),
            helper.make_node("Mul", [f"{scale}/nonzero", per_level], [scale]),
            helper.make_node("Div", [low, scale], [f"{zero_point}/float"]),
            helper.make_node("Round", [f"{zero_point}/float"], [f"{zero_point}/rounded"]),
            helper.make_node("Cast", [f"{zero_point}/rounded"], [zero_point], to=TensorProto.UINT8),
            helper.make_node("Reshape", [scale, minus_one], [f"{scale}/1d"]),
            helper.make_node("Reshape", [zero_point, minus_one], [f"{zero_point}/1d"]),
            helper.make_node("QuantizeLinear", [flat, f"{scale}/1d", f"{zero_point}/1d"], [f"{name}/rows"], axis=0),
            helper.make_node("Concat", [f"{name}/rows"] + [zero_point] * rows, [f"{name}/quantized"], axis=1),
        ]

    def _reduce(self, op: str, source: str, output: str) -> onnx.NodeProto:
        """`op` over the rows of the 2-D `source`. Axis 1 rather than -1: ONNX Runtime runs a reduction
        over a negative axis on one thread."""
        if self.opset >= _REDUCE_AXES_AS_INPUT:
            return helper.make_node(op, [source, self._constant("axis_1", np.array([1]))], [output], keepdims=1)
        return helper.make_node(op, [source], [output], axes=[1], keepdims=1)

    def _constant(self, key: str, value: np.ndarray) -> str:
        """A graph-wide constant, float32 or int64 by `value`'s kind."""
        if key not in self._constants:
            dtype = np.float32 if value.dtype.kind == "f" else np.int64
            self._constants[key] = self._initializer(f"{_PREFIX}/{key}", value.astype(dtype))
        return self._constants[key]

    def _initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name
