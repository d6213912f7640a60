"""Graph optimization of the fp32 export and its fp16 conversion.

Only rewrites that every execution provider runs are baked in: ONNX Runtime's basic level
(constant folding, redundant-node elimination: provider-independent by design), plus, for
BERT-like encoders, the transformer fusions (Attention, EmbedLayerNormalization,
SkipLayerNormalization, BiasGelu), whose contrib kernels exist for both the CPU and CUDA providers
at fp32 and fp16. Provider-specific rewrites (the extended and layout levels) are left to the
server's session, which applies them for the provider it actually runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import onnx
from onnx.checker import MAXIMUM_PROTOBUF
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model

# A decoder's KV cache inputs and outputs (optimum's names, which the fused graph keeps).
KV_CACHE_PREFIXES = ("past_key_values.", "present.")
_FORCE_EXTERNAL_DATA = "FORCE_ONNX_EXTERNAL_DATA"  # optimum's saver: weights in an external file
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
    counts = fused.get_fused_operator_statistics()
    return "BERT fusions: " + (", ".join(f"{op} x{n}" for op, n in counts.items() if n) or "none matched")


def to_fp16(source: Path, target: Path) -> str:
    """Writes an fp16 copy of `source` whose inputs and outputs stay fp32 (the server feeds and
    reads fp32 whatever the variant), except a decoder's KV cache (`past_key_values.*` in,
    `present.*` out), which becomes fp16: the server allocates the cache at the graph's own type,
    and an fp32 cache would take twice the memory and put a Cast of each layer's whole cache both
    ways around its attention at every step (GroupQueryAttention could then not write the shared
    buffer in place)."""
    kept = [name for name in _float_io(source) if not name.startswith(KV_CACHE_PREFIXES)]
    model = OnnxModel(convert_float_to_float16(str(source), keep_io_types=kept))
    # The converter appends its input casts at the end of the node list; ONNX wants nodes in
    # topological order (ONNX Runtime sorts by itself, the checker and optimum's merge do not).
    model.topological_sort()
    save_model(model.model, target)
    return "float16 conversion (onnxruntime converter), fp32 inputs and outputs but an fp16 KV cache"


def _float_io(path: Path) -> list[str]:
    """The graph's float32 inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [v.name for v in (*graph.input, *graph.output) if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]


def merge_decoders(decoder: Path, decoder_with_past: Path, target: Path) -> None:
    """optimum's merge: one graph, shared weights, an If on the use_cache_branch input."""
    from optimum.onnx import merge_decoders as merge

    # strict=False: the decoder with past does not output the (constant) cross-attention cache.
    if _size(decoder) + _size(decoder_with_past) < MAXIMUM_PROTOBUF:
        merge(decoder, decoder_with_past, save_path=target, strict=False)
        return
    # Past protobuf's 2 GiB, optimum's saver writes the weights to <file>_data when asked by this
    # variable; re-saving names the file <file>.data like every other variant's.
    with mock.patch.dict(os.environ, {_FORCE_EXTERNAL_DATA: "1"}):
        merge(decoder, decoder_with_past, save_path=target, strict=False)
    optimum_data = target.with_name(f"{target.name}_data")
    save_model(onnx.load(str(target)), target)
    optimum_data.unlink()


def move_model(source: Path, target: Path) -> None:
    """Moves an ONNX file; one with external weights is re-saved so that it names its new data file."""
    if external_data(source).is_file():
        save_model(onnx.load(str(source)), target)
        remove_model(source)
    else:
        os.replace(source, target)


def remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    external_data(path).unlink(missing_ok=True)


def external_data(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def _size(path: Path) -> int:
    data = external_data(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save_model(model: onnx.ModelProto, target: Path) -> None:
    """Saves `model`, moving its weights to `<target>.data` when it exceeds protobuf's 2 GiB."""
    if model.ByteSize() < MAXIMUM_PROTOBUF:
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(
            model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
            location=external_data(target).name,
        )  # fmt: skip


def opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
