"""ctrserve: CTR training, ONNX serving and A/B experiments. The CLI lives in ctrserve.cli."""

__version__ = "0.1.0"
