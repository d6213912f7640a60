"""Int8 variants of exported fp32 ONNX models: per-token activation quantization.

Recipe (`quantize_int8`): every MatMul whose weight is a constant 2-D fp32 matrix becomes a
MatMulIntegerToFloat (com.microsoft) times a row scale, fed by
- the weight in int8, symmetric, one scale per output channel (quantized once, here);
- the activation in uint8, asymmetric, one scale and zero point per row (token), computed in the
  graph: ReduceMax/ReduceMin over the row, QuantizeLinear along axis 0 of the [tokens, K] view.
A row's answer never depends on its batchmates, whereas dynamic quantization takes one scale over
the whole batch tensor, so that padding and neighbours move every answer.

MatMulInteger kernels take one zero point for all of A, so a per-row zero point cannot be passed.
It is folded into the same integer GEMM instead: J extra activation columns hold the row's zero
point and meet J extra int8 weight rows that sum to minus each column's weight sum, which
subtracts zero_point * column_sum exactly in the int32 accumulator (the GEMM's time does not move
with K + J). The channel scales are MatMulIntegerToFloat's B scale; the row scale is a Mul.
Activations shared by several MatMuls (query, key, value) are quantized once.

Graphs with control flow (If/Loop/Scan subgraphs), opset < 13 or no constant-weight MatMul get
ONNX Runtime's per-channel dynamic quantization instead, and the description says so.

Measured on all-MiniLM-L6-v2 (`python -m bench.int8_schemes`), from the graph the exporter hands
over (ONNX Runtime's basic optimizations): mean/min cosine of mean-pooled embeddings vs fp32 over
60 texts of 3 to 61 tokens; invariance: the worst cosine of a text alone vs inside a padded batch
of 8; texts/s at batch 32 (16-token and 128-token texts) on a 2-vCPU Xeon (Sapphire Rapids, AMX)
shared with other jobs, best of 6 interleaved rounds. Wall time, 2 intra-op threads, in a quiet
spell (busier runs measured per-token at 2.5-2.9x and 1.4-1.9x):

    scheme                          mean    min     invariance  16-token texts/s  128-token texts/s
    fp32                            1.0000  1.0000  1.000000      868 (1.00x)      100 (1.00x)
    dynamic, per-tensor weights     0.9552  0.7491  0.948538    1,995 (2.30x)      217 (2.18x)
    dynamic, per-channel weights    0.9921  0.9450  0.943027    2,011 (2.32x)      228 (2.29x)
    static QDQ, MinMax calibration  0.9258  0.6696  1.000000    1,459 (1.68x)      147 (1.48x)
    per-token (this recipe)         0.9986  0.9886  1.000000    1,712 (1.97x)      192 (1.93x)

CPU time of one intra-op thread (`--cpu-time`, the figure neighbours disturb least): per-token
2.54x fp32 on 16-token texts and 2.03x on 128-token texts; dynamic per-channel 2.66x and 2.22x.
So per-token meets the quality and invariance gates and is about 2x fp32, but just under it on
two threads: beyond dynamic it pays for the row statistics in separate ops (ReduceMax, ReduceMin,
QuantizeLinear, whose per-axis kernel runs row by row on one thread, and the zero-point Concat:
about 20% of its time on two threads) and for the row-scale Mul (about 9%), where ONNX Runtime's
DynamicQuantizeMatMul does all of it in one fused, parallel pass over the whole tensor.

Tried and dropped, measured the same way during development (cosines mean / min, speed vs fp32
at 128 tokens on one thread):
- symmetric per token (zero point 128): 0.9966 / 0.9686. A [CLS] row carries one huge channel
  (28 against a median of 0.1), so its other values round to zero; an asymmetric range spends no
  levels on values the row does not have. Keeping the value projections fp32 as well: 0.9984 /
  0.9844, and slower.
- SmoothQuant-style channel smoothing (alpha 0.5) calibrated on random tokens, symmetric:
  0.9985 / 0.9861, and it needs calibration data and an extra Mul per activation.
- the zero-point correction as a float rank-1 Mul + Sub on the output: same cosines, 1.36x.
- MatMulNBits 8-bit weights: 0.9997 / 0.9984 and invariant, but 0.9x fp32; with int8 compute
  (accuracy_level 4) 0.85x at block 32, and not invariant at block 128 (0.9985).
- ONNX Runtime's transformer fusions first (Attention, MultiHeadAttention, SkipLayerNormalization,
  BiasGelu): slower on this CPU, fp32 0.84-0.90x of the plain graph, per-token 1.64x vs 2.02x.
- the row scale as MatMulIntegerToFloat's A scale: same speed on one thread, but the kernel
  applies it on one thread where a Mul uses all of them.
- opset-21 blocked QuantizeLinear (per-row scales on the 3-D tensor): wrong values on ORT 1.31.
- per-token QuantizeLinear rebuilt as Mul + Add + per-tensor QuantizeLinear (all parallel): the
  two extra float passes cost more than the serial kernel saves (27.0 vs 25.8 ms of kernel time
  per 16-token batch on two threads).
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
_SUBGRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def quantize_int8(source: Path, target: Path) -> str:
    """Writes an int8 variant of the fp32 ONNX model `source` to `target`; returns a one-line
    description of the recipe (recorded in the model manifest)."""
    model = onnx.load(str(source))
    reason = _unsuited(model)
    if reason is None:
        quantized, total = _per_token_rewrite(model)
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
