"""Benchmarks of qsdonnx against peer ONNX weight quantizers: ``python -m benchmarks.run``."""
