"""What runs a model: ONNX Runtime sessions, the tokenizer, and the per-model batcher."""
