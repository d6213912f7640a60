"""onnxserve: a gRPC model server for Hugging Face transformers models exported to ONNX."""

__version__ = "0.1.0"
