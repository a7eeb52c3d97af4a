"""Compressed variants as ONNX graphs (`graph.py`) that onnxruntime runs (`runtime.py`)."""
