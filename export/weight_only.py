"""Weight-only int8 and int4 variants of decoder graphs, with onnxruntime's MatMulNBitsQuantizer.

Every MatMul whose weight is a constant becomes a MatMulNBits (com.microsoft): the weight in
blocks of BLOCK_SIZE values along K, each with its own scale (and zero point when asymmetric);
activations stay fp32. At int4 the token embedding's Gather becomes a GatherBlockQuantized, blocks
along the hidden axis (onnxruntime's quantizer quantizes a Gather to 4 bits only, so the int8
variant keeps its embedding fp32). Decoding one token reads every weight once, so its speed
follows the bytes of the weights.

At int4 the MatMuls most sensitive to rounding keep 8 bits, as llama.cpp's Q4_K_M mix gives them
6: the head, and attention v and MLP down in the first and last eighth of the layers and every
third layer between (its `use_more_bits`).

The recipes (blocks of 32, asymmetric, accuracy_level 4; a 4-bit embedding at int4 only; the 8-bit
MatMuls of int4) were chosen by measurement on Gemma 3 270M: speed, greedy agreement, perplexity
and size per recipe, and batch invariance, are in docs/int8.md.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxserve.export.optimize import save_model
from onnxserve.export.single_rows import pad_lone_rows


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """How MatMulNBitsQuantizer is set up for one precision."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int  # MatMulNBits' compute type: 4 quantizes activations to int8 per block
    quantize_embedding: bool  # the embedding Gather as GatherBlockQuantized (4 bits only)
    sensitive_bits: int | None = None  # the sensitive MatMuls' bits (`sensitive_matmuls`); None: `bits`

    def describe(self, matmuls: int, gathers: int, sensitive: int = 0) -> str:
        symmetry = "symmetric" if self.symmetric else "asymmetric"
        text = (
            f"weight-only int{self.bits}: {matmuls} MatMuls as MatMulNBits, blocks of {self.block_size}, "
            f"{symmetry}, accuracy_level {self.accuracy_level}"
        )
        if sensitive:
            text += (
                f"; {sensitive} of them at {self.sensitive_bits} bits (the head; attention v, MLP down in some layers)"
            )
        if self.quantize_embedding:
            text += f"; {gathers} embedding Gather as GatherBlockQuantized"
        return text


RECIPES = {
    "int8": WeightOnlyRecipe(bits=8, block_size=32, symmetric=False, accuracy_level=4, quantize_embedding=False),
    "int4": WeightOnlyRecipe(
        bits=4, block_size=32, symmetric=False, accuracy_level=4, quantize_embedding=True, sensitive_bits=8
    ),
}
# The fused decoder graph's names of the MatMuls that `sensitive_matmuls` picks (optimum's layouts
# name theirs otherwise, and keep `bits` throughout).
HEAD = "lm_head"
LAYER_MATMUL = re.compile(r"layers\.(\d+)\.(attn\.v_proj|mlp\.down_proj)/MatMul")


def quantize_weight_only(source: Path, target: Path, recipe: WeightOnlyRecipe) -> str:
    """Writes the weight-only quantized copy of `source` to `target`; returns the recipe in words."""
    model, sensitive = quantize_mixed(onnx.load(str(source)), recipe)
    pad_lone_rows(model)
    save_model(model, target)
    return recipe.describe(_count(model, "MatMulNBits"), _count(model, "GatherBlockQuantized"), sensitive)


def quantize_mixed(
    model: onnx.ModelProto, recipe: WeightOnlyRecipe, exclude: Sequence[str] = ()
) -> tuple[onnx.ModelProto, int]:
    """`model` quantized by `recipe`, its sensitive MatMuls at the recipe's sensitive bits, but the
    nodes named in `exclude`; and how many MatMuls were sensitive. The caller pads its 4-bit
    MatMulNBits once the graph is whole (export/single_rows.py)."""
    sensitive = sensitive_matmuls(model) if recipe.sensitive_bits else []
    model = quantize_model(model, recipe, exclude=[*exclude, *sensitive])
    if sensitive:  # the MatMuls left
        more_bits = replace(recipe, bits=recipe.sensitive_bits, quantize_embedding=False)
        model = quantize_model(model, more_bits, exclude=exclude)
    return model, len(sensitive)


def sensitive_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMuls that llama.cpp's Q4_K_M keeps at more bits: the head, and attention v and MLP
    down in the layers of `use_more_bits` (the first and last eighth, and every third between)."""
    names = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    in_layers = {name: int(match.group(1)) for name in names if (match := LAYER_MATMUL.fullmatch(name))}
    count = max(in_layers.values(), default=-1) + 1
    return [name for name in names if name == HEAD or (name in in_layers and _more_bits(in_layers[name], count))]


def _more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def quantize_model(model: onnx.ModelProto, recipe: WeightOnlyRecipe, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """`model` with its constant-weight MatMuls (and embedding Gather) but the nodes named in
    `exclude` quantized by `recipe`."""
    op_types = ("MatMul", "Gather") if recipe.quantize_embedding else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=recipe.bits,
        block_size=recipe.block_size,
        is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=op_types,
        # The embedding [vocab, hidden] is quantized in blocks along the hidden axis, as each
        # gathered row is then dequantized from its own blocks.
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    # Quantizing a Gather raises the model to opset 21 and IR 10 (int4 tensors), which the
    # quantizer warns "may not be a valid model": the gate runs the result, which is what tells.
    # Its numpy code divides by all-zero blocks' zero scale in branches np.where then discards.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        quantizer.process()
    return quantizer.model.model


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def quantize_int8_weights(source: Path, target: Path) -> str:
    """The int8 variant of a decoder graph."""
    return quantize_weight_only(source, target, RECIPES["int8"])


def quantize_int4_weights(source: Path, target: Path) -> str:
    """The int4 variant of a decoder graph."""
    return quantize_weight_only(source, target, RECIPES["int4"])
