"""Offline side of ctrserve: data sources, training, evaluation and ONNX export (torch)."""
