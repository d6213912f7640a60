"""Graph optimization of the fp32 export and its fp16 conversion.

Only rewrites that every execution provider runs are baked in: ONNX Runtime's basic level
(constant folding, redundant-node elimination: provider-independent by design), plus, for
BERT-like encoders, the transformer fusions (Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu), whose contrib kernels exist for both the CPU and CUDA providers
at fp32 and fp16. Provider-specific rewrites (the extended and layout levels) are left to the
server's session, which applies them for the provider it actually runs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.checker import MAXIMUM_PROTOBUF
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

# Encoder-only model types whose attention blocks match onnxruntime's BERT fusion patterns.
FUSED_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert"})


def can_fuse(model_type: str) -> bool:
    return model_type in FUSED_MODEL_TYPES


def optimize_basic(source: Path, target: Path) -> str:
    """ONNX Runtime's basic level: exact, provider-independent rewrites. Returns the recipe."""
    save_model(optimize_model(str(source), opt_level=1, use_gpu=False, only_onnxruntime=True).model, target)
    return "onnxruntime basic graph optimizations"


def fuse(source: Path, target: Path) -> str:
    """The BERT fusions (for `can_fuse` model types). Returns the recipe."""
    options = FusionOptions("bert")
    # Keep the 2D attention mask rather than a 1D "valid length": exact for any padding, left included.
    options.use_raw_attention_mask(True)
    fused = optimize_model(str(source), model_type="bert", opt_level=0, optimization_options=options)
    save_model(fused.model, target)
    return "BERT fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu)"


def to_fp16(source: Path, target: Path) -> str:
    """Writes an fp16 copy of `source` that keeps fp32 inputs and outputs (the server feeds and
    reads fp32 whatever the variant)."""
    save_model(convert_float_to_float16(str(source), keep_io_types=True), target)
    return "float16 conversion (onnxruntime converter), fp32 inputs and outputs"


def save_model(model: onnx.ModelProto, target: Path) -> None:
    """Saves `model`, moving its weights to `<target>.data` when it exceeds protobuf's 2 GiB."""
    if model.ByteSize() < MAXIMUM_PROTOBUF:
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(
            model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{target.name}.data",
        )  # fmt: skip


def opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
