"""onnxruntime's own quantizers with their defaults: the do-it-yourself INT8 baselines of `make bench`.

`quantize_static_defaults` is what a user calling `quantize_static(model, out, reader)` gets;
`quantize_dynamic_int8` is onnxruntime's dynamic quantization (after `quant_pre_process`).
Neither is part of the pipeline (that is `lathe.compress.quantize.quantize_static_int8`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import quantize_dynamic, quantize_static

from lathe.compress.calibration import reader_for
from lathe.compress.quantize import QUANT_TYPES, _finish, _quiet, check_source, pre_process
from lathe.errors import ConfigError, LatheError

# What `quantize_static` uses when called with only (model, output, reader) in onnxruntime 1.31.
ORT_STATIC_DEFAULTS = {
    "quant_format": "QDQ", "activation_type": "qint8", "weight_type": "qint8", "per_channel": False,
    "reduce_range": False, "calibrate_method": "minmax", "quant_pre_process": False,
}


def quantize_static_defaults(model_path: Path, images: np.ndarray, workdir: Path | None = None) -> bytes:
    """What a user calling `quantize_static(model, out, reader)` gets: no pre-processing, and
    onnxruntime 1.31's defaults (ORT_STATIC_DEFAULTS: QDQ, int8 activations and weights, per-tensor,
    no reduce_range, MinMax over every quantizable op). Calibrated on `images` like the pipeline."""
    model_path = Path(model_path)
    check_source(model_path)
    reader = reader_for(model_path, images)
    with tempfile.TemporaryDirectory(prefix="lathe-quantize-", dir=workdir) as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            with _quiet():
                quantize_static(str(model_path), str(out), reader)
        except Exception as exc:
            raise LatheError(f"{model_path}: onnxruntime quantize_static failed: {type(exc).__name__}: {exc}") from exc
        return _finish(out, None)


def quantize_dynamic_int8(model_path: Path, workdir: Path | None = None, per_channel: bool = False,
                          weight_type: str = "qint8", preprocess: bool = True) -> bytes:
    """Dynamic INT8 model bytes: weights quantized offline, activations at run time (no calibration).

    onnxruntime's dynamic defaults otherwise (all ops of its integer-ops registry, per-tensor int8
    weights, no reduce_range). Measured on CNNs here it runs several times slower than FP32
    (ConvInteger + float rescaling); it is offered for comparison only. `preprocess` runs
    quant_pre_process first.
    """
    model_path = Path(model_path)
    check_source(model_path)
    if weight_type not in QUANT_TYPES:
        raise ConfigError(f"weight_type {weight_type!r}: expected one of {sorted(QUANT_TYPES)}")
    with tempfile.TemporaryDirectory(prefix="lathe-quantize-", dir=workdir) as tmp:
        src, out = model_path, Path(tmp) / "model.onnx"
        if preprocess:
            src = Path(tmp) / "pre.onnx"
            pre_process(model_path, src)
        try:
            with _quiet():
                quantize_dynamic(str(src), str(out), per_channel=per_channel, weight_type=QUANT_TYPES[weight_type])
        except Exception as exc:
            raise LatheError(f"{model_path}: onnxruntime quantize_dynamic failed: {type(exc).__name__}: {exc}") from exc
        return _finish(out, None)
