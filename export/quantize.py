"""Int8 variants of exported fp32 ONNX models: per-token activation quantization.

Recipe (`quantize_int8`): every MatMul whose weight is a constant 2-D fp32 matrix becomes a
MatMulIntegerToFloat (com.microsoft) fed by

- the weight in int8, symmetric, one scale per output channel (quantized once, here);
- the activation in uint8, asymmetric, one scale and zero point per row (token), computed in the
  graph: ReduceMax/ReduceMin over the last axis, QuantizeLinear along axis 0 of the [tokens, K]
  view. A row's answer therefore never depends on its batchmates (dynamic quantization takes one
  scale over the whole batch tensor, so padding and neighbours move every answer).

MatMulInteger kernels take one scalar zero point for A, so a per-row zero point cannot be passed.
It is folded into the same integer GEMM instead: J extra columns holding the row's zero point
meet J extra int8 weight rows that sum to minus each column's weight sum, which subtracts
zero_point * column_sum exactly in the int32 accumulator. The row scale is MatMulIntegerToFloat's
A scale ([tokens, 1], applied to its output), the channel scales its B scale. Activations shared
by several MatMuls (query/key/value) are quantized once.

Graphs with control flow (If/Loop/Scan subgraphs) or opset < 13 get ONNX Runtime's per-channel
dynamic quantization instead, and the description says so.

Measured on all-MiniLM-L6-v2 (bench/int8_schemes.py), 60 varied texts, cosine of mean-pooled
embeddings vs fp32; batch invariance = worst cosine of a text alone vs inside a padded batch of 8.
(Figures being re-measured: see bench/int8_schemes.py.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType, quantize_nparray
from onnxserve.export.optimize import save_model

_MS_DOMAIN = "com.microsoft"
_MIN_OPSET = 13  # QuantizeLinear's per-axis scales
_REDUCE_AXES_AS_INPUT = 18  # ReduceMax/ReduceMin take `axes` as an input from opset 18 on
_INT8_MAX = int(get_qmin_qmax_for_qType(TensorProto.INT8, symmetric=True)[1])  # 127
_UINT8_LEVELS = 255.0
_PREFIX = "per_token_int8"


def quantize_int8(source: Path, target: Path) -> str:
    """Writes an int8 variant of the fp32 ONNX model `source` to `target`; returns a one-line
    description of the recipe (recorded in the model manifest)."""
    model = onnx.load(str(source))
    reason = _unsuited(model)
    if reason is None:
        quantized, total = per_token_rewrite(model)
        if quantized:
            save_model(model, target)
            return (
                f"per-token int8: {quantized} of {total} MatMuls as MatMulIntegerToFloat, int8 weights "
                "per output channel, uint8 activations with a scale and zero point per token"
            )
        reason = "no MatMul with a constant 2-D fp32 weight"
    _quantize_dynamic(source, target, large=model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF)
    return (
        f"dynamic int8 ({reason}): per-channel int8 MatMul weights, one uint8 activation scale "
        "per batch tensor (answers depend on batchmates)"
    )


def _unsuited(model: onnx.ModelProto) -> str | None:
    """Why the per-token rewrite does not apply to `model`, or None."""
    if _opset(model) < _MIN_OPSET:
        return f"opset {_opset(model)} < {_MIN_OPSET}"
    # The rewrite walks the main graph only; subgraphs would keep fp32 MatMuls unnoticed.
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in model.graph.node for attr in node.attribute):  # fmt: skip
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
        """Extra rows needed so that each column's int8 parts can sum to minus its column sum."""
        return max(1, -(-int(np.abs(self.column_sums).max()) // _INT8_MAX))

    @property
    def column_sums(self) -> np.ndarray:
        return self.values.astype(np.int64).sum(axis=0)

    def with_zero_point_rows(self, rows: int) -> np.ndarray:
        """The weight with `rows` int8 rows appended whose column sums are minus the weight's: against
        activation columns that all hold a row's zero point z, they add -z * column_sum."""
        total = -self.column_sums
        # floor(total * (j + 1) / rows) - floor(total * j / rows): parts differ by at most one and
        # stay within int8 as |total| <= 127 * rows.
        steps = np.arange(rows + 1)[:, None] * total[None, :] // rows
        return np.concatenate([self.values, np.diff(steps, axis=0).astype(np.int8)])


def per_token_rewrite(model: onnx.ModelProto) -> tuple[int, int]:
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
    peak = np.abs(weight).max(axis=0)
    scales = np.where(peak > 0, peak / _INT8_MAX, 1.0).astype(np.float32)
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
        inputs = [quantized, values, scale, scales]
        return [
            *nodes,
            helper.make_node("MatMulIntegerToFloat", inputs, [f"{name}/2d"], name=name, domain=_MS_DOMAIN),
            # Back to the activation's leading dimensions, with N columns.
            helper.make_node("Shape", [activation], [f"{name}/activation_shape"]),
            helper.make_node(
                "Slice",
                [f"{name}/activation_shape", self._constant("zero_1d", [0]), self._constant("minus_one", [-1])],
                [f"{name}/leading"],
            ),
            helper.make_node("Concat", [f"{name}/leading", columns], [f"{name}/shape"], axis=0),
            helper.make_node("Reshape", [f"{name}/2d", f"{name}/shape"], [output]),
        ]

    def _quantize_rows(self, activation: str, depth: int, rows: int) -> list[onnx.NodeProto]:
        """uint8 [tokens, depth + rows] of `activation`: each quantized row, then `rows` copies of its
        zero point; and the row scales [tokens, 1]."""
        name = f"{_PREFIX}/{activation}"
        flat, high, low, scale, zero_point = (f"{name}/{part}" for part in ("2d", "max", "min", "scale", "zp"))
        self._quantized[activation] = (f"{name}/quantized", scale)
        flat_shape = self._initializer(f"{name}/2d_shape", np.array([-1, depth], dtype=np.int64))
        zero, minus_one = self._constant("zero", 0.0), self._constant("minus_one", [-1])
        tiny = self._constant("tiny", float(np.finfo(np.float32).tiny))
        return [
            helper.make_node("Reshape", [activation, flat_shape], [flat]),
            # The range always holds zero, so that zero (padding, ReLU) stays exact.
            self._reduce("ReduceMax", flat, f"{high}/raw"),
            helper.make_node("Max", [f"{high}/raw", zero], [high]),
            self._reduce("ReduceMin", flat, f"{low}/raw"),
            helper.make_node("Min", [f"{low}/raw", zero], [low]),
            helper.make_node("Sub", [high, low], [f"{scale}/range"]),
            helper.make_node("Div", [f"{scale}/range", self._constant("levels", _UINT8_LEVELS)], [f"{scale}/raw"]),
            # An all-zero row gets any positive scale rather than a division by zero.
            helper.make_node("Max", [f"{scale}/raw", tiny], [scale]),
            helper.make_node("Div", [low, scale], [f"{zero_point}/negative"]),
            helper.make_node("Neg", [f"{zero_point}/negative"], [f"{zero_point}/float"]),
            helper.make_node("Round", [f"{zero_point}/float"], [f"{zero_point}/rounded"]),
            helper.make_node("Cast", [f"{zero_point}/rounded"], [zero_point], to=TensorProto.UINT8),
            helper.make_node("Reshape", [scale, minus_one], [f"{scale}/1d"]),
            helper.make_node("Reshape", [zero_point, minus_one], [f"{zero_point}/1d"]),
            helper.make_node("QuantizeLinear", [flat, f"{scale}/1d", f"{zero_point}/1d"], [f"{name}/rows"], axis=0),
            helper.make_node("Tile", [zero_point, self._constant(f"tile_{rows}", [1, rows])], [f"{zero_point}/cols"]),
            helper.make_node("Concat", [f"{name}/rows", f"{zero_point}/cols"], [f"{name}/quantized"], axis=1),
        ]

    def _reduce(self, op: str, source: str, output: str) -> onnx.NodeProto:
        if self.opset >= _REDUCE_AXES_AS_INPUT:
            return helper.make_node(op, [source, self._constant("last_axis", [-1])], [output], keepdims=1)
        return helper.make_node(op, [source], [output], axes=[-1], keepdims=1)

    def _constant(self, key: str, value: float | list[int]) -> str:
        if key not in self._constants:
            dtype = np.float32 if isinstance(value, float) else np.int64
            self._constants[key] = self._initializer(f"{_PREFIX}/{key}", np.array(value, dtype=dtype))
        return self._constants[key]

    def _initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name
