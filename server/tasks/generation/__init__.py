"""Text generation (Generate, GenerateStream) for causal and seq2seq models, decoded on ONNX
Runtime with a KV cache: no torch and no transformers at serving time."""

from onnxserve.server.tasks.generation.pipeline import GenerationPipeline

__all__ = ["GenerationPipeline"]
