"""What the detection and segmentation parity tests share: a tiny random checkpoint saved with its
image processor, its class heads spread so that labels are no near-ties, and the transformers
pipeline that is the oracle."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch
from transformers import AutoImageProcessor, PreTrainedModel, pipeline


def save_checkpoint(model: PreTrainedModel, processor: object, directory: Path, spreads: Mapping[str, float]) -> Path:
    """Saves `model` and `processor` into `directory`, each parameter whose name starts with a key
    of `spreads` first drawn uniformly within +- its spread."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            spread = next((value for prefix, value in spreads.items() if name.startswith(prefix)), None)
            if spread is not None:
                parameter.uniform_(-spread, spread)
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@cache
def reference_pipeline(task: str, checkpoint: Path):
    """`pipeline(task)` on the checkpoint, with its slow (PIL and numpy) image processor."""
    processor = AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    return pipeline(task, model=str(checkpoint), image_processor=processor, device="cpu")
