"""What the speech tests share: synthetic speech-like audio, encoding it as files, the tiny
wav2vec2-family encoder layout their checkpoints are built with, and KServe v2 audio requests."""

from __future__ import annotations

import io

import numpy as np
import soundfile

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2

RATE = 16000
#: A two-layer encoder over wav2vec2's feature encoder layout, narrow: 320 samples (20 ms) per
#: frame, as wav2vec2 and HuBERT.
TINY_ENCODER = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
    "conv_dim": (16,) * 7, "conv_kernel": (10, 3, 3, 3, 3, 2, 2), "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
}  # fmt: skip


def speech_like(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """Tones with a wandering pitch, syllable-like bursts and noise: speech's range of levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 80 * np.sin(2 * np.pi * (0.5 + seed / 10) * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / rate) + 0.5 * np.sin(2 * np.pi * 5 * np.cumsum(pitch) / rate)
    envelope = np.clip(np.sin(2 * np.pi * (3 + seed / 7) * t), 0, None)
    return (0.5 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def encoded(samples: np.ndarray, rate: int = RATE, format: str = "WAV", subtype: str | None = None) -> bytes:
    """The samples as a file of `format` (libsndfile's names: WAV, FLAC, OGG, MP3, ...)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def audio_request(model: str, files: list[bytes], **parameters: int | str) -> v2.ModelInferRequest:
    """A KServe v2 ModelInfer with a BYTES input `audio` (encoded files) and parameters."""
    request = v2.ModelInferRequest(model_name=model)
    request.inputs.add(name="audio", datatype="BYTES", shape=[len(files)]).contents.bytes_contents.extend(files)
    for name, value in parameters.items():
        kind = {int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request
