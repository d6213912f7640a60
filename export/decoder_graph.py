"""The fused decoder graph of docs/decoder-graph.md, written node by node from a transformers
causal LM's weights.

Per layer: RMSNorms as SimplifiedLayerNormalization, with the residual add fused in
(SkipSimplifiedLayerNormalization); q/k/v projections as MatMuls (plus their biases); Gemma 3's
per-head q/k norms; GroupQueryAttention doing the rotary embedding itself from cos/sin caches and
writing the KV cache in place when past and present share a buffer; the o_proj and the gated MLP.
Only each row's last real token goes through the final norm's output to the lm_head, a MatMul
with its own [hidden, vocab] weight even when the checkpoint ties it to the embedding, so that
the weight-only quantizer can turn it into MatMulNBits (and the embedding Gather into
GatherBlockQuantized).

Everything model-specific is read from the PyTorch modules themselves (each attention's scaling
and sliding window, the rotary modules' cos/sin), so that rope scaling variants and Gemma 3's two
rotary bases come out as transformers computes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxserve.export.optimize import save_model
from transformers import PretrainedConfig, PreTrainedModel

_OPSET = 21
_IR_VERSION = 10  # opset 21's; onnx's newest IR is ahead of what ONNX Runtime loads
_MS_DOMAIN = "com.microsoft"
# Gemma's RMSNorm scales by (1 + weight); the others by weight.
_NORM_WEIGHT_OFFSET = {"llama": 0.0, "qwen2": 0.0, "gemma3_text": 1.0}
_GQA_HEAD_DIM_MULTIPLE = 16  # ONNX Runtime's GroupQueryAttention kernels refuse other head sizes
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# Rope types whose cos/sin do not depend on the sequence length seen so far ("dynamic" and
# "longrope" switch frequencies with it, which fixed caches cannot follow).
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
RECIPE = (
    "fused decoder: GroupQueryAttention (rotary inside, KV buffer shared past/present), "
    "SkipSimplifiedLayerNormalization, lm_head on the last token only"
)


def supports_fused_decoder(config: PretrainedConfig) -> bool:
    """Whether `build_decoder_graph` can build this causal LM exactly."""
    rope_scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    return (
        config.model_type in _NORM_WEIGHT_OFFSET
        and _activation(config) in _ACTIVATIONS
        and rope_type in _STATIC_ROPE_TYPES
        and getattr(config, "partial_rotary_factor", 1.0) == 1.0
        and not getattr(config, "use_bidirectional_attention", False)
        and _head_dim(config) % _GQA_HEAD_DIM_MULTIPLE == 0
    )


def build_decoder_graph(model: PreTrainedModel, output: Path, *, max_length: int) -> str:
    """Writes the fp32 fused graph of `model` (a causal LM that `supports_fused_decoder`) to
    `output`, with rotary caches for `max_length` positions; weights go to `<output>.data` past
    protobuf's 2 GiB. Returns the recipe for the manifest."""
    if not supports_fused_decoder(model.config):
        raise ValueError(f"no fused decoder graph for model type {model.config.model_type}")
    with torch.no_grad():
        graph = _DecoderGraph(model, max_length).build()
    save_model(graph, output)
    return RECIPE


def _activation(config: PretrainedConfig) -> str:
    return getattr(config, "hidden_activation", None) or config.hidden_act


def float_array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).numpy()


class GraphWriter:
    """Accumulates the nodes and initializers of one graph written node by node (this module's and
    whisper_graph's)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.array(values, dtype=np.int64))

    def node(
        self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attributes
    ) -> list[str]:
        """Adds a node; `outputs` is a count of outputs named after the node, or their names."""
        if isinstance(outputs, int):
            outputs = [f"{name}/out{index}" for index in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attributes))
        return outputs

    def op(self, op: str, inputs: list[str], name: str, output: str | None = None, **attributes) -> str:
        """Adds a single-output node and returns its output's name."""
        return self.node(op, inputs, name, [output] if output else 1, **attributes)[0]

    def linear(self, module: torch.nn.Linear, x: str, name: str) -> str:
        """x @ W.T (+ b), with W stored transposed as MatMul's [in, out] weight."""
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", float_array(module.weight).T)], f"{name}/MatMul")
        if module.bias is None:
            return y
        return self.op("Add", [y, self.weight(f"{name}.bias", float_array(module.bias))], f"{name}/Add")

    def last_tokens(self, hidden: str) -> str:
        """Each row's hidden state at index min(seqlens_k, sequence - 1): its last real token."""
        sequence = self.op("Shape", ["input_ids"], "last/Shape", start=1, end=2)
        last_column = self.op("Sub", [sequence, self.constant("one", [1])], "last/LastColumn")
        seqlens = self.op("Cast", ["seqlens_k"], "last/Cast", to=TensorProto.INT64)
        index = self.op("Min", [seqlens, last_column], "last/Index")
        index = self.op("Unsqueeze", [index, self.constant("last.axis", [-1])], "last/Indices")
        rows = self.op("GatherND", [hidden, index], "last/GatherND", batch_dims=1)
        return self.op("Unsqueeze", [rows, self.constant("token.axis", [1])], "last/Unsqueeze")

    def finish(
        self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        """The graph so far as a model of opset 21 with the contrib operators."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", _OPSET), helper.make_opsetid(_MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=_IR_VERSION, producer_name="onnxserve")


class _DecoderGraph(GraphWriter):
    """The fused graph of one causal LM."""

    def __init__(self, model: PreTrainedModel, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.max_length = max_length
        self.norm_offset = _NORM_WEIGHT_OFFSET[self.config.model_type]
        self.rotary_caches: dict[int, tuple[str, str]] = {}  # id(rotary module) -> cos, sin names

    # Blocks

    def norm_weight(self, norm: torch.nn.Module, name: str) -> str:
        return self.weight(f"{name}.weight", float_array(norm.weight) + self.norm_offset)

    def norm(self, norm: torch.nn.Module, x: str, name: str) -> str:
        return self.op(
            "SimplifiedLayerNormalization", [x, self.norm_weight(norm, name)], name, axis=-1, epsilon=_epsilon(norm)
        )

    def add_and_norm(self, branch: str | None, residual: str, norm: torch.nn.Module, name: str) -> tuple[str, str]:
        """norm(residual + branch) and the new residual; with no branch yet, norm(residual)."""
        if branch is None:
            return self.norm(norm, residual, name), residual
        normed, _, _, added = self.node(
            "SkipSimplifiedLayerNormalization",
            [branch, residual, self.norm_weight(norm, name)],
            name,
            outputs=4,
            domain=_MS_DOMAIN,
            epsilon=_epsilon(norm),
        )
        return normed, added

    def head_norm(self, norm: torch.nn.Module, x: str, heads: int, name: str) -> str:
        """Gemma 3's q/k norm: an RMSNorm over each head's vector."""
        head_dim = norm.weight.shape[0]
        per_head = self.op("Reshape", [x, self.constant(f"{name}.heads", [0, 0, heads, head_dim])], f"{name}/Split")
        normed = self.norm(norm, per_head, name)
        return self.op("Reshape", [normed, self.constant(f"{name}.flat", [0, 0, heads * head_dim])], f"{name}/Join")

    def rotary(self, layer_index: int) -> tuple[str, str]:
        """The cos/sin caches of the layer's rotary module ([max_length, head_dim / 2]: GQA's
        non-interleaved layout, whose halves transformers repeats)."""
        module = self._rotary_module(layer_index)
        if id(module) not in self.rotary_caches:
            positions = torch.arange(self.max_length)[None]
            cos, sin = module(torch.zeros(1, dtype=torch.float32), positions)
            half = cos.shape[-1] // 2
            index = len(self.rotary_caches)
            self.rotary_caches[id(module)] = (
                self.weight(f"rotary.{index}.cos", float_array(cos[0, :, :half])),
                self.weight(f"rotary.{index}.sin", float_array(sin[0, :, :half])),
            )
        return self.rotary_caches[id(module)]

    def _rotary_module(self, layer_index: int) -> torch.nn.Module:
        decoder = self.model.model
        # Gemma 3's sliding layers rotate with their own base frequency.
        layer_types = getattr(self.config, "layer_types", None) or []
        if hasattr(decoder, "rotary_emb_local") and layer_types[layer_index] == "sliding_attention":
            return decoder.rotary_emb_local
        return decoder.rotary_emb

    def attention(self, index: int, attention: torch.nn.Module, x: str) -> str:
        name = f"layers.{index}.attn"
        heads, kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        query = self.linear(attention.q_proj, x, f"{name}.q_proj")
        key = self.linear(attention.k_proj, x, f"{name}.k_proj")
        value = self.linear(attention.v_proj, x, f"{name}.v_proj")
        if hasattr(attention, "q_norm"):
            query = self.head_norm(attention.q_norm, query, heads, f"{name}.q_norm")
            key = self.head_norm(attention.k_norm, key, kv_heads, f"{name}.k_norm")
        cos, sin = self.rotary(index)
        # transformers' sliding_window and GQA's local_window_size both count the keys a query
        # sees, its own included (tests/test_decoder_graph.py decodes across the window).
        window = getattr(attention, "sliding_window", None)
        # No softcap: transformers' Gemma 3 attention never applies attn_logit_softcapping.
        output, _, _ = self.node(
            "GroupQueryAttention",
            [query, key, value, f"past_key_values.{index}.key", f"past_key_values.{index}.value",
             "seqlens_k", "total_sequence_length", cos, sin],
            f"{name}/GroupQueryAttention",
            outputs=[f"{name}/out", f"present.{index}.key", f"present.{index}.value"],
            domain=_MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(attention.scaling),
            local_window_size=window or -1,
            do_rotary=1,
            rotary_interleaved=0,
        )  # fmt: skip
        return self.linear(attention.o_proj, output, f"{name}.o_proj")

    def mlp(self, index: int, mlp: torch.nn.Module, x: str) -> str:
        name = f"layers.{index}.mlp"
        gate = self.linear(mlp.gate_proj, x, f"{name}.gate_proj")
        if _activation(self.config) == "silu":
            activated = self.op("Mul", [gate, self.op("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
        else:
            activated = self.op("Gelu", [gate], f"{name}/Gelu", approximate="tanh")
        up = self.linear(mlp.up_proj, x, f"{name}.up_proj")
        return self.linear(mlp.down_proj, self.op("Mul", [activated, up], f"{name}/Mul"), f"{name}.down_proj")

    def embedding(self) -> str:
        embed = self.model.get_input_embeddings()
        table = self.weight("embed_tokens.weight", float_array(embed.weight))
        rows = self.op("Gather", [table, "input_ids"], "embed_tokens")
        if not hasattr(embed, "embed_scale"):
            return rows
        # Gemma scales the looked-up rows. The table keeps the checkpoint's values, so that a
        # GGUF's quantized embedding can replace it exactly (export/gguf_weights.py).
        scale = self.weight("embed_scale", float_array(embed.embed_scale.to(embed.weight.dtype)))
        return self.op("Mul", [rows, scale], "embed_tokens/Scale")

    def logits(self, hidden: str) -> str:
        head = self.model.get_output_embeddings()
        weight = self.weight("lm_head.weight", float_array(head.weight).T)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if not cap:
            return self.op("MatMul", [hidden, weight], "lm_head", output="logits")
        logits = self.op("MatMul", [hidden, weight], "lm_head")
        cap_name = self.weight("logit_softcap", np.array(cap, dtype=np.float32))
        capped = self.op("Tanh", [self.op("Div", [logits, cap_name], "softcap/Div")], "softcap/Tanh")
        return self.op("Mul", [capped, cap_name], "softcap/Mul", output="logits")

    def layer(self, index: int, layer: torch.nn.Module, branch: str | None, residual: str) -> tuple[str, str]:
        """One decoder layer: its output branch (still to be added to the residual) and the residual."""
        name = f"layers.{index}"
        x, residual = self.add_and_norm(branch, residual, layer.input_layernorm, f"{name}.input_layernorm")
        attended = self.attention(index, layer.self_attn, x)
        if not hasattr(layer, "pre_feedforward_layernorm"):
            x, residual = self.add_and_norm(
                attended, residual, layer.post_attention_layernorm, f"{name}.post_attention_layernorm"
            )
            return self.mlp(index, layer.mlp, x), residual
        # Gemma 3 norms each block's output too, before it joins the residual.
        attended = self.norm(layer.post_attention_layernorm, attended, f"{name}.post_attention_layernorm")
        x, residual = self.add_and_norm(
            attended, residual, layer.pre_feedforward_layernorm, f"{name}.pre_feedforward_layernorm"
        )
        mlp = self.mlp(index, layer.mlp, x)
        return self.norm(layer.post_feedforward_layernorm, mlp, f"{name}.post_feedforward_layernorm"), residual

    def build(self) -> onnx.ModelProto:
        residual, branch = self.embedding(), None
        for index, layer in enumerate(self.model.model.layers):
            branch, residual = self.layer(index, layer, branch, residual)
        hidden, _ = self.add_and_norm(branch, residual, self.model.model.norm, "norm")
        self.logits(self.last_tokens(hidden))
        return self._model()

    def _model(self) -> onnx.ModelProto:
        config = self.config
        cache_dims = ["batch_size", config.num_key_value_heads, "past_sequence_length", _head_dim(config)]
        present_dims = ["batch_size", config.num_key_value_heads, "present_sequence_length", _head_dim(config)]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, config.vocab_size])]
        for index in range(len(self.model.model.layers)):
            for kind in ("key", "value"):
                past, present = f"past_key_values.{index}.{kind}", f"present.{index}.{kind}"
                inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, cache_dims))
                outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, present_dims))
        return self.finish("fused_decoder", inputs, outputs)


def _epsilon(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
