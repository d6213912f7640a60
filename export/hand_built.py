"""Graphs the exporter writes itself with torch.onnx where optimum's exporter cannot make what the
server needs (ExportSpec.hand_built, server/tasks/registration.py):

- CLIP's two towers as two graphs of one version: `text_model.onnx` (input_ids, attention_mask ->
  text_embeds = get_text_features, and CLIP's logit scale, exp(logit_scale), once per row) and
  `vision_model.onnx` (pixel_values -> image_embeds = get_image_features), so that Encode runs
  the text tower alone and EncodeImage the vision tower alone, in one embedding space, and
  zero-shot classification scores their cosines as CLIPModel does. optimum exports CLIP as one
  graph that needs both a text and an image for every run, and returns the embeddings normalized.
- A SimMIM head (AutoModelForMaskedImageModeling) with its mask as an input: `model.onnx`
  (pixel_values, bool_masked_pos -> reconstruction). optimum's masked-im export takes
  pixel_values alone, so every patch would be seen and nothing reconstructed.

Each writes fp32 graphs where optimum would (`work/<name>.onnx`); the exporter then optimizes and
converts them as it does optimum's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from onnxserve.export.errors import ExportError

OPSET = 17  # LayerNormalization as one op; ONNX Runtime runs it on every provider


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return features, self.model.logit_scale.exp().expand(input_ids.shape[0])


class _VisionTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))


class _MaskedImageModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).reconstruction


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """get_*_features' tensor (newer transformers wrap it in an output with pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(checkpoint: Path, auto_class: str) -> torch.nn.Module:
    return getattr(transformers, auto_class).from_pretrained(checkpoint, dtype=torch.float32).eval()


def _export(
    module: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], target: Path, axes: dict
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                str(target),
                input_names=list(inputs),
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,  # the TorchScript exporter, as optimum uses: no onnxscript needed
            )
    except (RuntimeError, ValueError, TypeError) as error:
        raise ExportError(f"torch.onnx could not export {target.stem}: {error}") from error


def build_clip_towers(checkpoint: Path, work: Path) -> None:
    """text_model.onnx and vision_model.onnx of a CLIP checkpoint."""
    model = _load(checkpoint, "AutoModel")
    vision = model.config.vision_config
    text = {"input_ids": torch.ones(2, 7, dtype=torch.int64), "attention_mask": torch.ones(2, 7, dtype=torch.int64)}
    text_axes = {name: {0: "batch", 1: "sequence"} for name in text} | {"text_embeds": {0: "batch"}}
    text_axes["logit_scale"] = {0: "batch"}
    _export(_TextTower(model), text, ["text_embeds", "logit_scale"], work / "text_model.onnx", text_axes)
    pixels = {"pixel_values": torch.rand(2, vision.num_channels, vision.image_size, vision.image_size)}
    image_axes = {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}
    _export(_VisionTower(model), pixels, ["image_embeds"], work / "vision_model.onnx", image_axes)


def build_masked_image_modeling(checkpoint: Path, work: Path) -> None:
    """model.onnx of a SimMIM head, with bool_masked_pos [batch, patches] as an input."""
    model = _load(checkpoint, "AutoModelForMaskedImageModeling")
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    inputs = {
        "pixel_values": torch.rand(2, config.num_channels, config.image_size, config.image_size),
        "bool_masked_pos": torch.zeros(2, patches, dtype=torch.bool),
    }
    axes = {"pixel_values": {0: "batch"}, "bool_masked_pos": {0: "batch"}, "reconstruction": {0: "batch"}}
    _export(_MaskedImageModel(model), inputs, ["reconstruction"], work / "model.onnx", axes)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "clip_towers": build_clip_towers,
    "masked_image_modeling": build_masked_image_modeling,
}
