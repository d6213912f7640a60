"""Server settings: what `onnxserve serve` takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSettings:
    """How each model is served."""

    precision: str = "auto"  # auto, fp32, fp16 or int8
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    intra_op_threads: int = 0  # 0: ONNX Runtime's default, one per physical core
    inter_op_threads: int = 1


@dataclass(frozen=True)
class ServerSettings:
    repository: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"  # auto, cpu or cuda
    models: ModelSettings = ModelSettings()
    shutdown_grace_s: float = 10.0
