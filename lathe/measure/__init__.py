"""Measurement: onnxruntime evaluation and its report files, metrics, compare, bench and the plots."""
