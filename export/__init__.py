"""`onnxserve export`: transformers checkpoints to validated ONNX model-repository versions.

The entry point is `onnxserve.export.exporter.export_model`; importing this package loads nothing
heavy, so the server never pulls PyTorch in."""
