"""4-bit MatMulNBits that never run a lone row, so that a row's result does not depend on its
batchmates on any CPU (issue 17 item 5).

ONNX Runtime 1.31's MatMulNBits computes one row (M=1) on a kernel path of its own, which on
AVX2-only CPUs rounds otherwise than its path for M >= 2 at 4 bits (at any accuracy_level), while
every M >= 2 gives a row the same bits (docs/batching.md). A decode step of one stream is M=1, so a
stream decoded alone would get other tokens than beside batchmates. Each 4-bit MatMulNBits here
gets one extra input row (a copy of the first) and its output row is dropped: M + 1 >= 2 rows, the
same bits whatever the batch, at the cost of one row in those nodes only. The server's spare row
(server/tasks/generation/fused.py) pads the whole step instead, and stays for whatever else its
probe finds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_PADDED_BITS = 4
_ZERO, _ONE, _LAST = "single_rows.zero", "single_rows.one", "single_rows.minus_one"


def pad_lone_rows(model: onnx.ModelProto) -> int:
    """Rewrites `model`'s 4-bit MatMulNBits in place to run one row more than they are given;
    returns how many."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    padded = 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits" and attributes["bits"] == _PADDED_BITS:
            nodes += _padded(node, attributes["K"], attributes["N"], graph)
            padded += 1
        else:
            nodes.append(node)
    if padded:
        graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
                                 ((_ZERO, 0), (_ONE, 1), (_LAST, -1)))  # fmt: skip
        del graph.node[:]
        graph.node.extend(nodes)
    return padded


def _padded(node: onnx.NodeProto, k: int, n: int, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """x [..., K] as rows [M, K], its first row appended, the node over the M + 1 rows, the last
    output row dropped and the rest shaped [..., N] again."""
    x, y = node.input[0], node.output[0]
    name = f"{node.name}/single_rows"  # a prefix of its own: the node's may prefix other names
    rows_shape, out_n = f"{name}/rows_shape", f"{name}/n"
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1, k], np.int64), rows_shape),
        numpy_helper.from_array(np.array([n], np.int64), out_n),
    ])  # fmt: skip

    def op(op_type: str, inputs: list[str], output: str, **attributes: int) -> onnx.NodeProto:
        return helper.make_node(op_type, inputs, [output], name=f"{output}/{op_type}", **attributes)

    inner = helper.make_node(node.op_type, [f"{name}/rows_padded", *node.input[1:]], [f"{name}/out_padded"],
                             name=node.name, domain=node.domain)  # fmt: skip
    inner.attribute.extend(node.attribute)
    return [
        op("Reshape", [x, rows_shape], f"{name}/rows"),
        op("Slice", [f"{name}/rows", _ZERO, _ONE, _ZERO], f"{name}/first"),
        op("Concat", [f"{name}/rows", f"{name}/first"], f"{name}/rows_padded", axis=0),
        inner,
        op("Slice", [f"{name}/out_padded", _ZERO, _LAST, _ZERO], f"{name}/out"),
        op("Shape", [x], f"{name}/leading", start=0, end=-1),
        op("Concat", [f"{name}/leading", out_n], f"{name}/out_shape", axis=0),
        op("Reshape", [f"{name}/out", f"{name}/out_shape"], y),
    ]
