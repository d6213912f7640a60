"""Int8 variants of exported fp32 ONNX models.

First version: per-channel dynamic quantization of constant-weight MatMuls (a per-token recipe
for encoders follows once measured).
"""

from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data
from onnxruntime.quantization import QuantType, quantize_dynamic


def _uses_external_data(source: Path) -> bool:
    # Exporters move weights out of the protobuf (2 GiB limit) for big models; keep it that way.
    graph = onnx.load(str(source), load_external_data=False).graph
    return any(uses_external_data(t) for t in graph.initializer)


def quantize_int8(source: Path, target: Path) -> str:
    """Writes an int8 variant of the fp32 ONNX model `source` to `target`; returns a one-line
    description of the recipe (recorded in the model manifest)."""
    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=_uses_external_data(source),
        extra_options={"MatMulConstBOnly": True},
    )
    return "dynamic int8: per-channel QInt8 weights, per-tensor uint8 activations, MatMul only"
