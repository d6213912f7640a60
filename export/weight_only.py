"""Weight-only int8 and int4 variants of decoder graphs, with onnxruntime's MatMulNBitsQuantizer.

Every MatMul whose weight is a constant becomes a MatMulNBits (com.microsoft): the weight in
blocks of BLOCK_SIZE values along K, each with its own scale (and zero point when asymmetric);
activations stay fp32. At int4 the token embedding's Gather becomes a GatherBlockQuantized, blocks
along the hidden axis (onnxruntime's quantizer quantizes a Gather to 4 bits only, so the int8
variant keeps its embedding fp32). Decoding one token reads every weight once, so its speed
follows the bytes of the weights.

Measured on Gemma 3 270M (optimum's graph of the fp32 export, 127 MatMuls; the generative gate's
6 prompts x 64 greedy tokens and its perplexity text, export/generative_gate.py): tokens/s is the
median decode step in CPU time on one intra-op thread (2 shared cores, load 5 to 13 from other
work, so wall time meant little); fp32 decodes 11.5 tokens/s there, 1,744 MB.

    bits  block  symmetry  embedding  tokens/s  full agreement  common prefixes      perplexity  file
    8     32     asym      fp32       24.1      4 of 6          64 64 64 1 24 64     +1.2%       982 MB  <- int8
    8     128    asym      fp32       27.8      3 of 6          17 64 64 1 17 64     +1.0%       951 MB
    8     32     sym       fp32       26.5      3 of 6          18 64 64 1 24 64     -0.7%       974 MB
    8     32     asym      4 bits     23.9      2 of 6           5 64 64 1 24 2      -5.2%       418 MB
    4     32     asym      4 bits     36.5      0 of 6           3 1 2 1 17 2        +16.0%      280 MB  <- int4
    4     32     asym      fp32       38.0      0 of 6           1 1 2 1 17 2        +20.1%      844 MB
    4     32     sym       4 bits     32.1      0 of 6           1 1 2 1 5 0         +57.5%      273 MB
    4     128    asym      4 bits     44.3      0 of 6           0 1 0 0 4 0         +95.4%      234 MB

The same recipes on the fused decoder graph (export/decoder_graph.py) of the same model, fp32
11.3 tokens/s in CPU time and 20.6 wall on two threads (load about 1.5):

    variant  tokens/s CPU  wall, 2 threads  full agreement  common prefixes    perplexity  file
    int8     30.3          45.4             3 of 6          18 64 64 1 6 64    +2.4%       1,048 MB
    int4     45.5          63.0             0 of 6          3 1 2 1 17 0       +15.5%      347 MB

All with accuracy_level 4 (int8 activations inside MatMulNBits, per block). Blocks of 32 keep
int8's agreement on most prompts, and they alone keep int4's perplexity near the reference;
asymmetric blocks fit the skewed weight distributions that symmetric ones waste levels on. The
4-bit embedding costs int8 two prompts' agreement, so int8 keeps it fp32, and saves int4 560 MB.
On a tiny Llama (hidden 32), accuracy_level 4 with blocks of 32 gives bit-identical logits for a
row alone and in a batch of 3 (continuous batching relies on it); accuracy_level 0 and blocks of
128 differ by up to 4e-6. On Gemma's fused graph, too, int8 and int4 logits of 3 rows batched
equal each row's alone bit for bit, over a prefill and 6 steps. 8 bits at accuracy_level 0 (fp32
compute) ran the gate on Gemma's fused graph for over 400 s where accuracy_level 4 took 25 s: too
slow to consider. Keeping Gemma's lm_head at 8 bits in int4 gave +12.2% perplexity instead of
+16%, but 25% slower decoding.

The figures above were taken while Gemma's GGUF tokenizer still split words wrongly (perplexity
234 on the gate's text; 16.1 once it tokenized as llama.cpp does). Remeasured on the fused graph
after that fix (wall tokens/s on two threads, load about 1; perplexity vs PyTorch's 16.13):

    variant                    tokens/s  full agreement  common prefixes    perplexity  file
    int8, blocks of 32, asym   -         3 of 6          11 15 64 20 64 64  +1.7%       1,048 MB
    int4, blocks of 32, asym   52.4      0 of 6          1 0 4 0 0 0        +29.0%      347 MB  <- int4
    int4, blocks of 16, asym   40.2      0 of 6          0 0 2 6 0 2        +20.7%      408 MB
    int4, blocks of 32, sym    40.5      0 of 6          1 1 2 0 0 0        +47.8%      340 MB

Blocks of 16 cost int4 a quarter of its speed for 8 points of perplexity; int4 is the precision
chosen for speed and memory, so it keeps blocks of 32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxserve.export.optimize import save_model


@dataclass(frozen=True)
class WeightOnlyRecipe:
    """How MatMulNBitsQuantizer is set up for one precision."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int  # MatMulNBits' compute type: 4 quantizes activations to int8 per block
    quantize_embedding: bool  # the embedding Gather as GatherBlockQuantized (4 bits only)

    def describe(self, matmuls: int, gathers: int) -> str:
        symmetry = "symmetric" if self.symmetric else "asymmetric"
        text = (
            f"weight-only int{self.bits}: {matmuls} MatMuls as MatMulNBits, blocks of {self.block_size}, "
            f"{symmetry}, accuracy_level {self.accuracy_level}"
        )
        if self.quantize_embedding:
            text += f"; {gathers} embedding Gather as GatherBlockQuantized"
        return text


RECIPES = {
    "int8": WeightOnlyRecipe(bits=8, block_size=32, symmetric=False, accuracy_level=4, quantize_embedding=False),
    "int4": WeightOnlyRecipe(bits=4, block_size=32, symmetric=False, accuracy_level=4, quantize_embedding=True),
}


def quantize_weight_only(source: Path, target: Path, recipe: WeightOnlyRecipe) -> str:
    """Writes the weight-only quantized copy of `source` to `target`; returns the recipe in words."""
    op_types = ("MatMul", "Gather") if recipe.quantize_embedding else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)),
        bits=recipe.bits,
        block_size=recipe.block_size,
        is_symmetric=recipe.symmetric,
        accuracy_level=recipe.accuracy_level,
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
    model = quantizer.model.model
    save_model(model, target)
    return recipe.describe(_count(model, "MatMulNBits"), _count(model, "GatherBlockQuantized"))


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def quantize_int8_weights(source: Path, target: Path) -> str:
    """The int8 variant of a decoder graph."""
    return quantize_weight_only(source, target, RECIPES["int8"])


def quantize_int4_weights(source: Path, target: Path) -> str:
    """The int4 variant of a decoder graph."""
    return quantize_weight_only(source, target, RECIPES["int4"])
