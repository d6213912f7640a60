"""Whisper's fused decoder (docs/decoder-graph.md, "Whisper"), written node by node from a
transformers WhisperForConditionalGeneration, so that rows at different lengths, each over its own
audio, share one decode step (continuous batching), as the causal LMs' fused graph allows.

optimum's decoder-with-past cannot: its rows share one past length (Whisper's positions are
learned and absolute, and its decoder takes no attention mask). Here each row's position is
gathered from its own length (`seqlens_k`), self-attention is GroupQueryAttention without rotary
over the shared KV buffer, and cross-attention reads each row's encoder keys and values from
inputs that the serving side keeps per row. Those come from a second graph (`build_cross_graph`),
run once per row when it joins, so that the 1500 encoder frames are projected once per audio
window, not once per step. Blocks are Whisper's: pre-LayerNorm self-attention, cross-attention
and GELU MLP, then the final LayerNorm and the head (tied to the token embedding, written as its
own MatMul so that weight-only quantization applies to it), on each row's last real token only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnxserve.export.decoder_graph import GraphWriter, float_array
from onnxserve.export.optimize import save_model
from transformers import PretrainedConfig, PreTrainedModel

_MS_DOMAIN = "com.microsoft"
ENCODER_STATES = "encoder_hidden_states"
#: The roles (and files) of the graphs served beside optimum's encoder and decoder.
WHISPER_GRAPHS = {"fused_decoder": ("fused_decoder.onnx",), "cross_attention": ("cross_attention.onnx",)}
RECIPE = (
    "fused Whisper decoder: learned positions gathered per row, GroupQueryAttention without rotary "
    "(KV buffer shared past/present), cross-attention over per-row encoder keys/values from the "
    "cross_attention graph, head on the last token only"
)


def cross_key_name(layer: int) -> str:
    """Layer `layer`'s encoder keys, [batch, heads, head_dim, frames]: stored transposed, as the
    query's MatMul takes them."""
    return f"cross_key_values.{layer}.key"


def cross_value_name(layer: int) -> str:
    """Layer `layer`'s encoder values, [batch, heads, frames, head_dim]."""
    return f"cross_key_values.{layer}.value"


def supports_whisper_decoder(config: PretrainedConfig) -> bool:
    """Whether `build_whisper_graphs` can build this checkpoint exactly."""
    return (
        config.model_type == "whisper"
        and config.activation_function == "gelu"
        and not config.scale_embedding
        and config.d_model % config.decoder_attention_heads == 0
    )


def build_whisper_graphs(model: PreTrainedModel, decoder: Path, cross_attention: Path) -> str:
    """Writes the fp32 fused decoder of `model` (a WhisperForConditionalGeneration that
    `supports_whisper_decoder`) to `decoder`, and the graph of its encoder keys and values to
    `cross_attention`. Returns the recipe for the manifest."""
    if not supports_whisper_decoder(model.config):
        raise ValueError("no fused decoder graph for this Whisper checkpoint")
    with torch.no_grad():
        save_model(_CrossAttentionGraph(model).build(), cross_attention)
        save_model(_WhisperDecoderGraph(model).build(), decoder)
    return RECIPE


class _WhisperGraph(GraphWriter):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.config = model.config
        self.model = model
        self.decoder = model.model.decoder
        self.heads = self.config.decoder_attention_heads
        self.head_dim = self.config.d_model // self.heads

    def split_heads(self, x: str, name: str, perm: list[int]) -> str:
        """[batch, length, heads x head_dim] -> the heads' axes in `perm`'s order."""
        heads = self.op("Reshape", [x, self.constant(f"{name}.heads", [0, 0, self.heads, self.head_dim])], name)
        return self.op("Transpose", [heads], f"{name}/Transpose", perm=perm)

    def cross_infos(self, index: int) -> list[onnx.ValueInfoProto]:
        """Layer `index`'s encoder keys and values: the cross graph's outputs, the decoder's inputs.
        Their frames are fixed (every window is 30 s), so that the serving side can size their buffers."""
        frames = self.config.max_source_positions
        return [
            helper.make_tensor_value_info(
                cross_key_name(index), TensorProto.FLOAT, ["batch_size", self.heads, self.head_dim, frames]
            ),
            helper.make_tensor_value_info(
                cross_value_name(index), TensorProto.FLOAT, ["batch_size", self.heads, frames, self.head_dim]
            ),
        ]


class _CrossAttentionGraph(_WhisperGraph):
    """encoder_hidden_states [batch, frames, d_model] -> every decoder layer's encoder keys and values."""

    def build(self) -> onnx.ModelProto:
        outputs = []
        for index, layer in enumerate(self.decoder.layers):
            name = f"layers.{index}.encoder_attn"
            key = self.linear(layer.encoder_attn.k_proj, ENCODER_STATES, f"{name}.k_proj")
            value = self.linear(layer.encoder_attn.v_proj, ENCODER_STATES, f"{name}.v_proj")
            key_t = self.split_heads(key, f"{name}.key", [0, 2, 3, 1])
            value_t = self.split_heads(value, f"{name}.value", [0, 2, 1, 3])
            self.op("Identity", [key_t], f"{name}/key", output=cross_key_name(index))
            self.op("Identity", [value_t], f"{name}/value", output=cross_value_name(index))
            outputs += self.cross_infos(index)
        inputs = [
            helper.make_tensor_value_info(
                ENCODER_STATES, TensorProto.FLOAT, ["batch_size", self.config.max_source_positions, self.config.d_model]
            )
        ]
        return self.finish("whisper_cross_attention", inputs, outputs)


class _WhisperDecoderGraph(_WhisperGraph):
    """The fused decoder: docs/decoder-graph.md's inputs and outputs, plus the encoder keys and values."""

    def layer_norm(self, norm: torch.nn.LayerNorm, x: str, name: str) -> str:
        weight = self.weight(f"{name}.weight", float_array(norm.weight))
        bias = self.weight(f"{name}.bias", float_array(norm.bias))
        return self.op("LayerNormalization", [x, weight, bias], name, axis=-1, epsilon=float(norm.eps))

    def scaled_query(self, attention: torch.nn.Module, x: str, name: str) -> str:
        """q_proj(x) * scaling, scaled before the product as transformers does (Whisper is sensitive to it)."""
        query = self.linear(attention.q_proj, x, f"{name}.q_proj")
        scale = self.weight(f"{name}.scaling", np.array(attention.scaling, dtype=np.float32))
        return self.op("Mul", [query, scale], f"{name}/Scale")

    def embedding(self) -> str:
        """Token embedding plus each token's learned position: the row's past length (from
        seqlens_k: max(seqlens_k + 1 - sequence, 0), 0 in a right-padded prefill) plus its column."""
        embed_tokens = self.weight("embed_tokens.weight", float_array(self.decoder.embed_tokens.weight))
        tokens = self.op("Gather", [embed_tokens, "input_ids"], "embed_tokens")
        sequence = self.op("Shape", ["input_ids"], "positions/Shape", start=1, end=2)
        seqlens = self.op("Cast", ["seqlens_k"], "positions/Cast", to=TensorProto.INT64)
        count = self.op("Add", [seqlens, self.constant("positions.one", [1])], "positions/Count")
        past = self.op("Sub", [count, sequence], "positions/Past")
        past = self.op("Max", [past, self.constant("positions.zero", [0])], "positions/PastClamped")
        scalar = self.op("Squeeze", [sequence, self.constant("positions.axis0", [0])], "positions/Length")
        zero, one = (self.weight(f"positions.{n}", np.array(v, dtype=np.int64)) for n, v in (("start", 0), ("step", 1)))
        columns = self.op("Range", [zero, scalar, one], "positions/Columns")
        past = self.op("Unsqueeze", [past, self.constant("positions.axis1", [1])], "positions/Rows")
        positions = self.op("Add", [past, columns], "positions/Ids")
        table = self.weight("embed_positions.weight", float_array(self.decoder.embed_positions.weight))
        return self.op("Add", [tokens, self.op("Gather", [table, positions], "embed_positions")], "embed/Add")

    def self_attention(self, index: int, attention: torch.nn.Module, x: str) -> str:
        name = f"layers.{index}.self_attn"
        query = self.scaled_query(attention, x, name)
        key = self.linear(attention.k_proj, x, f"{name}.k_proj")
        value = self.linear(attention.v_proj, x, f"{name}.v_proj")
        output, _, _ = self.node(
            "GroupQueryAttention",
            [query, key, value, f"past_key_values.{index}.key", f"past_key_values.{index}.value",
             "seqlens_k", "total_sequence_length"],
            f"{name}/GroupQueryAttention",
            outputs=[f"{name}/out", f"present.{index}.key", f"present.{index}.value"],
            domain=_MS_DOMAIN,
            num_heads=self.heads,
            kv_num_heads=self.heads,
            scale=1.0,  # the query is scaled already
            do_rotary=0,
        )  # fmt: skip
        return self.linear(attention.out_proj, output, f"{name}.out_proj")

    def cross_attention(self, index: int, attention: torch.nn.Module, x: str) -> str:
        """softmax(q K^T) V over the row's encoder frames (no mask: every window has all 1500)."""
        name = f"layers.{index}.encoder_attn"
        query = self.split_heads(self.scaled_query(attention, x, name), f"{name}.query", [0, 2, 1, 3])
        scores = self.op("MatMul", [query, cross_key_name(index)], f"{name}/Scores")
        weights = self.op("Softmax", [scores], f"{name}/Softmax", axis=-1)
        context = self.op("MatMul", [weights, cross_value_name(index)], f"{name}/Context")
        context = self.op("Transpose", [context], f"{name}/Context/Transpose", perm=[0, 2, 1, 3])
        merged = self.constant(f"{name}.merged", [0, 0, self.config.d_model])
        context = self.op("Reshape", [context, merged], f"{name}/Context/Merge")
        return self.linear(attention.out_proj, context, f"{name}.out_proj")

    def mlp(self, index: int, layer: torch.nn.Module, x: str) -> str:
        name = f"layers.{index}"
        hidden = self.op("Gelu", [self.linear(layer.fc1, x, f"{name}.fc1")], f"{name}/Gelu")
        return self.linear(layer.fc2, hidden, f"{name}.fc2")

    def layer(self, index: int, layer: torch.nn.Module, hidden: str) -> str:
        name = f"layers.{index}"
        blocks = (
            ("self_attn_layer_norm", lambda x: self.self_attention(index, layer.self_attn, x)),
            ("encoder_attn_layer_norm", lambda x: self.cross_attention(index, layer.encoder_attn, x)),
            ("final_layer_norm", lambda x: self.mlp(index, layer, x)),
        )
        for norm_name, block in blocks:
            branch = block(self.layer_norm(getattr(layer, norm_name), hidden, f"{name}.{norm_name}"))
            hidden = self.op("Add", [hidden, branch], f"{name}.{norm_name}/Residual")
        return hidden

    def build(self) -> onnx.ModelProto:
        hidden = self.embedding()
        for index, layer in enumerate(self.decoder.layers):
            hidden = self.layer(index, layer, hidden)
        hidden = self.layer_norm(self.decoder.layer_norm, hidden, "layer_norm")
        head = self.weight("proj_out.weight", float_array(self.model.proj_out.weight).T)
        self.op("MatMul", [self.last_tokens(hidden), head], "proj_out", output="logits")
        return self.finish("whisper_decoder", self._inputs(), self._outputs())

    def _inputs(self) -> list[onnx.ValueInfoProto]:
        cache = ["batch_size", self.heads, "past_sequence_length", self.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
        for index in range(len(self.decoder.layers)):
            inputs += [
                helper.make_tensor_value_info(f"past_key_values.{index}.key", TensorProto.FLOAT, cache),
                helper.make_tensor_value_info(f"past_key_values.{index}.value", TensorProto.FLOAT, cache),
                *self.cross_infos(index),
            ]
        return inputs

    def _outputs(self) -> list[onnx.ValueInfoProto]:
        cache = ["batch_size", self.heads, "present_sequence_length", self.head_dim]
        logits = ["batch_size", 1, self.config.vocab_size]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits)]
        for index in range(len(self.decoder.layers)):
            for kind in ("key", "value"):
                outputs.append(helper.make_tensor_value_info(f"present.{index}.{kind}", TensorProto.FLOAT, cache))
        return outputs
