"""Whisper's alignment graph: the cross-attention weights of the alignment heads (the
generation config's `alignment_heads`, [layer, head] pairs) for a teacher-forced pass of the
decoder over a window's tokens, which the server turns into word timestamps by dynamic time
warping (server/tasks/word_timestamps.py), as transformers' `_extract_token_timestamps` does with
the attentions `generate()` returns. optimum's decoder graphs return no attentions, so this graph
is written with torch.onnx beside them: `alignment.onnx`, input_ids [batch, tokens] and
encoder_hidden_states [batch, frames, d_model] -> cross_attentions [batch, heads, tokens, frames].

It runs the decoder with eager attention up to the last layer that holds an alignment head (later
layers cannot change those weights), and is written once in fp32 and listed in every variant:
the DTW's path follows the weights' order, which quantization moves. The median filter's width
(the model config's `median_filter_width`) goes in the graph's metadata, as the server reads no
config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxserve.export.errors import ExportError
from onnxserve.export.optimize import optimize_basic, save_model
from onnxserve.export.progress import Steps, quiet
from onnxserve.server.tasks.word_timestamps import (
    ALIGNMENT_FILE,
    ALIGNMENT_HEADS_KEY,
    ALIGNMENT_ROLE,
    MEDIAN_FILTER_KEY,
)
from transformers import GenerationConfig, PretrainedConfig, WhisperForConditionalGeneration

OPSET = 17
#: How far the graph's weights may be from PyTorch's on the check's sample (float32 rounding).
MAX_WEIGHT_DIFF = 1e-4


class _AlignmentHeads(torch.nn.Module):
    """The decoder's cross-attention weights of the alignment heads, stacked on axis 1."""

    def __init__(self, model: WhisperForConditionalGeneration, heads: list[tuple[int, int]]) -> None:
        super().__init__()
        self.decoder = model.model.decoder
        self.decoder.layers = self.decoder.layers[: max(layer for layer, _ in heads) + 1]
        self.heads = heads

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        # The causal mask given whole (additive, as eager attention takes it): transformers builds
        # it with vmap, which the TorchScript exporter cannot trace.
        tokens = input_ids.shape[1]
        future = torch.ones(tokens, tokens, dtype=torch.bool, device=input_ids.device).triu(1)
        mask = torch.zeros(tokens, tokens).masked_fill(future, torch.finfo(torch.float32).min)
        output = self.decoder(
            input_ids=input_ids,
            attention_mask=mask.expand(input_ids.shape[0], 1, tokens, tokens),
            encoder_hidden_states=encoder_hidden_states,
            output_attentions=True,
            use_cache=False,
        )
        return self.stacked(output.cross_attentions)

    def stacked(self, cross_attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack([cross_attentions[layer][:, head] for layer, head in self.heads], dim=1)


def alignment_heads(config: PretrainedConfig, generation: GenerationConfig | None) -> list[tuple[int, int]]:
    """The checkpoint's alignment heads; none for other models than Whisper or a generation
    config without them."""
    heads = getattr(generation, "alignment_heads", None) if config.model_type == "whisper" else None
    return [(int(layer), int(head)) for layer, head in heads or ()]


def add_alignment_graph(
    checkpoint: Path, config: PretrainedConfig, generation: GenerationConfig | None, stage: Path, steps: Steps
) -> dict[str, Path]:
    """The alignment graph's role and file, to list in every variant: written into the staging
    folder for a Whisper checkpoint with alignment heads; none for other models."""
    heads = alignment_heads(config, generation)
    if not heads:
        return {}
    with steps.step(f"building the alignment heads' graph ({len(heads)} heads, fp32)"), quiet():
        return {ALIGNMENT_ROLE: build_alignment_graph(checkpoint, heads, stage)}


def build_alignment_graph(checkpoint: Path, heads: list[tuple[int, int]], stage: Path) -> Path:
    """Writes `alignment.onnx` into the staging folder and checks it against PyTorch; returns its path."""
    model = WhisperForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    layers, attention_heads = config.decoder_layers, config.decoder_attention_heads
    bad = [pair for pair in heads if not (0 <= pair[0] < layers and 0 <= pair[1] < attention_heads)]
    if bad:
        raise ExportError(
            f"generation_config.json's alignment_heads {bad} are outside the decoder's "
            f"{layers} layers x {attention_heads} heads"
        )
    module = _AlignmentHeads(model, heads)
    sample = _sample(config)
    raw = stage / "alignment.raw.onnx"
    target = stage / ALIGNMENT_FILE
    axes = {
        "input_ids": {0: "batch", 1: "tokens"},
        "encoder_hidden_states": {0: "batch"},
        "cross_attentions": {0: "batch", 2: "tokens"},
    }
    try:
        with torch.no_grad():
            torch.onnx.export(
                module, tuple(sample.values()), str(raw), input_names=list(sample), output_names=["cross_attentions"],
                dynamic_axes=axes, opset_version=OPSET, dynamo=False,
            )  # fmt: skip
    except (RuntimeError, ValueError, TypeError) as error:
        raise ExportError(f"torch.onnx could not export Whisper's alignment heads: {error}") from error
    optimize_basic(raw, target)
    raw.unlink()
    graph = onnx.load(str(target))
    metadata = {MEDIAN_FILTER_KEY: str(config.median_filter_width), ALIGNMENT_HEADS_KEY: json.dumps(heads)}
    onnx.helper.set_model_props(graph, metadata)
    save_model(graph, target)
    _check(module, target, sample)
    return target


def _sample(config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """A decoder input of two rows of seven tokens over random encoder states."""
    generator = torch.Generator().manual_seed(16)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=generator)
    hidden = torch.randn(2, config.max_source_positions, config.d_model, generator=generator)
    return {"input_ids": ids, "encoder_hidden_states": hidden}


def _check(module: _AlignmentHeads, graph: Path, sample: dict[str, torch.Tensor]) -> None:
    """The graph's weights against PyTorch's decoder (its own causal mask) on the sample;
    ExportError past float32 rounding."""
    with torch.no_grad():
        output = module.decoder(**sample, output_attentions=True, use_cache=False)
        expected = module.stacked(output.cross_attentions).numpy()
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: value.numpy() for name, value in sample.items()})
    difference = float(np.abs(got - expected).max())
    if got.shape != expected.shape or difference > MAX_WEIGHT_DIFF:
        raise ExportError(
            f"the alignment heads' graph differs from PyTorch: shape {got.shape} vs {expected.shape}, "
            f"largest difference {difference:.2e}"
        )
