"""The quantize step: static INT8 (QDQ) quantization of an ONNX model with onnxruntime, the pipeline's recipe.

Calibration images and readers are in `lathe.compress.calibration`; what got quantized is inspected by
`lathe.compress.quant_inspect`; the dynamic and "onnxruntime defaults" quantizers (the bench's
baselines) are in `lathe.compress.quantize_baselines`.

The static path (`quantize_static_int8`), all inside one temporary folder:

1. `quant_pre_process`: symbolic + ONNX shape inference and onnxruntime's basic graph optimisations
   (BatchNorm/constant folding), as onnxruntime recommends before quantizing.
2. Calibration with onnxruntime's own calibrators (`create_calibrator`), fed CALIBRATION_BATCH
   images per `collect_data` call. We calibrate here instead of inside `quantize_static` because
   `quantize_static` does not forward `num_bins`/`num_quantized_bins` to the entropy calibrator, whose
   defaults (128 and 128) leave exactly one candidate threshold - the full range - so `entropy`
   silently equals MinMax (measured: byte-identical models). We pass `quantize.histogram_bins`
   (default 2048, as TensorRT's entropy calibration) and 128 quantized bins; the settings used are in
   `calibrator_options` and recorded in quantize.json. onnxruntime's entropy search is pure Python:
   ~1 s per calibrated tensor at 2048 bins here.
3. `quantize_static(QuantFormat.QDQ, ...)` reading those ranges from a calibration cache file
   (its documented `calibration_cache_path`). For MinMax this gives byte-for-byte the model that
   `quantize_static` calibrating by itself gives (a test checks it).
4. With `quantize.bias_correction` (default), each quantized conv's int32 bias is moved to cancel the
   mean shift that rounding its weights causes on the calibration images
   (`lathe.compress.bias_correction`; measured there: +7.5 points on a 224 px EfficientNet-Lite0).
   With `quantize.sequential_bias_correction` (default off), each conv's output mean is then matched
   to the float model's conv by conv on the INT8 chain (one calibration pass per conv).

Determinism: with the same model, images and settings the result is byte-identical, also across
processes and PYTHONHASHSEED values (checked). onnxruntime 1.31 writes no temp paths, random names
or timestamps into the model; it adds metadata `onnx.infer` / `onnx.quant.pre_process` (constant)
and we add `lathe.compress.quantize.*` keys, sorted.

Inputs are (N, S, S) uint8 images preprocessed with `lathe.measure.ort.to_input`, so calibration sees
exactly what evaluation and deployment feed the model. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from lathe.compress.bias_correction import correct_conv_biases, correct_conv_output_means
from lathe.compress.calibration import (
    CALIBRATION_BATCH,
    CALIBRATION_SPLIT,
    ImageReader,
    _Single,
    calibration_ids_sha256,
    calibration_indices,
    reader_for,
)
from lathe.compress.params import QuantizeParams
from lathe.compress.quant_inspect import compare_with_float, float_compute_nodes, node_type_counts
from lathe.compress.records import QUANTIZE_RECORD
from lathe.data.ingest import image_geometry, load_split
from lathe.determinism import numerics_record
from lathe.errors import DataError, LatheError
from lathe.io import sha256_bytes, sha256_file, write_bytes, write_json
from lathe.measure.ort import MODEL_FILE, check_input, input_spec, load_proto, load_session, model_files
from lathe.model.export import set_metadata

# 7-bit weights: CPUs without VNNI (AVX2) multiply uint8 x int8 pairs with a saturating 16-bit add
# (vpmaddubsw), CPUs with VNNI/AMX do not; with 7 bits no pair saturates, so INT8 inference gives the
# same bits everywhere (measured: logits identical on AVX-512/AMX and emulated AVX2 Intel and AMD,
# 704 of 1024 logits apart without it).
REDUCE_RANGE = True
RANGE_BITS = 12  # calibration ranges snapped outward to 12 significant bits (snap_outward)
CHECK_SPLIT = "val"  # held-out images on which the quantized model is compared with the float one
RECORD_FILE = QUANTIZE_RECORD
# metadata_props of every quantized model: what it was quantized from and calibrated on. Part of the
# model format (and its bytes), named once; not Python module paths.
SOURCE_SHA_KEY = "lathe.quantize.source_sha256"
CALIBRATION_IDS_SHA_KEY = "lathe.quantize.calibration_ids_sha256"
ENTROPY_QUANTIZED_BINS = 128  # onnxruntime's own default for the simulated quantized histogram
QUANT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# The op types quantize_static quantizes when not told otherwise (sorted: the library builds them from a set).
QUANTIZABLE_OPS = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model (one self-contained ONNX file) and the record written beside it."""

    model_bytes: bytes
    record: dict


# ---------------------------------------------------------------------------------------------
# The source model


def check_source(model_path: Path) -> onnx.ModelProto:
    """The float model: it must exist, parse, and keep all weights inside the file.

    External data is refused: the quantized folder holds one self-contained model.onnx, and a side
    file would be read from wherever the reference points.
    """
    model_path = Path(model_path)
    proto = load_proto(model_path)  # names the file when missing or unreadable
    try:
        files = model_files(model_path)
    except LatheError as exc:
        raise LatheError(f"{exc}; quantize needs a model without external data") from exc
    if len(files) > 1:
        raise LatheError(f"{model_path}: weights are stored in external data ({', '.join(str(f) for f in files[1:])}); "
                         "quantize needs one self-contained ONNX file (export with external_data=False)")
    return proto


def check_images(images: np.ndarray, where: Path) -> tuple[int, int]:
    """(N, S, S) or (N, C, S, S) uint8 with N >= 1; returns (C, S)."""
    channels, side = image_geometry(images, where)
    if len(images) == 0:
        raise DataError(f"{where}: the split is empty")
    return channels, side


# ---------------------------------------------------------------------------------------------
# Quantizing


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's calibrators print progress to stdout; keep a stage's output to its own log lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def pre_process(model_path: Path, dest: Path) -> None:
    """onnxruntime's quant_pre_process (shape inference + basic optimisations) into `dest`."""
    try:
        with _quiet():
            quant_pre_process(str(model_path), str(dest))
    except Exception as exc:  # the library raises whatever its shape inference hits
        raise LatheError(f"{model_path}: quant_pre_process failed ({type(exc).__name__}: {exc}). Global pooling "
                         "exported as ReduceMean/ReduceMax breaks its shape inference; export a full-window "
                         "AveragePool instead") from exc


def calibrator_options(cfg: QuantizeParams) -> dict[str, float | int | bool]:
    """The calibrator settings for `cfg.method`, as passed to onnxruntime's create_calibrator."""
    if cfg.method == "entropy":
        return {"num_bins": cfg.histogram_bins, "num_quantized_bins": ENTROPY_QUANTIZED_BINS, "symmetric": False}
    if cfg.method == "percentile":
        return {"num_bins": cfg.histogram_bins, "percentile": cfg.percentile, "symmetric": True}
    return {"symmetric": False, "moving_average": False}


def calibrate(model_path: Path, reader: ImageReader, cfg: QuantizeParams, cache: Path) -> None:
    """Compute activation ranges of the (pre-processed) model into the calibration cache file `cache`."""
    method = CALIBRATION_METHODS[cfg.method]
    try:
        with _quiet():
            calibrator = create_calibrator(
                Path(model_path), QUANTIZABLE_OPS, augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
                calibrate_method=method, extra_options=calibrator_options(cfg),
            )
            for feed in reader.batches():
                calibrator.collect_data(_Single(feed))
            ranges = calibrator.compute_data()
    except Exception as exc:  # onnxruntime raises plain ValueError/RuntimeError and pybind errors
        raise LatheError(f"{model_path}: calibration ({cfg.method}) failed: {type(exc).__name__}: {exc}") from exc
    for data in ranges.data.values():
        if hasattr(data, "lowest") and hasattr(data, "highest"):
            data.lowest, data.highest = snap_outward(data.lowest, up=False), snap_outward(data.highest, up=True)
    save_tensors_data(ranges, cache)


def snap_outward(value: np.ndarray, up: bool) -> np.ndarray:
    """`value` rounded away from the inside of its range to RANGE_BITS significant bits.

    The ranges come from onnxruntime's float kernels, which differ between AVX-512 and AVX2 CPUs
    in the last bits of some outputs (measured: logits 1 ulp apart). Two such values land on the
    same grid point unless they straddle one (odds ~2^-(23-RANGE_BITS) per differing value), so the
    scales in the model bytes agree across machines; the range grows by at most 2^-RANGE_BITS.
    """
    m, e = np.frexp(np.asarray(value, dtype=np.float64))  # value = m * 2**e, 0.5 <= |m| < 1
    grid = 2.0 ** RANGE_BITS
    snapped = np.ldexp((np.ceil if up else np.floor)(m * grid) / grid, e)
    return snapped.astype(np.asarray(value).dtype)


def _finish(path: Path, metadata: dict[str, str] | None) -> bytes:
    """The written model as bytes, checked, with `metadata` merged into metadata_props (sorted)."""
    proto = onnx.load(str(path))
    if metadata:
        set_metadata(proto, metadata)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise LatheError(f"the quantized model is not valid ONNX: {exc}") from exc
    return proto.SerializeToString()


def quantize_static_int8(model_path: Path, images: np.ndarray, cfg: QuantizeParams, workdir: Path | None = None,
                         metadata: dict[str, str] | None = None) -> bytes:
    """Static INT8 (QDQ) model bytes of the float model at `model_path`, calibrated on `images`.

    images: (N, S, S) uint8, fed through `to_input`. Temp files live in a TemporaryDirectory under
    `workdir` (default: the system temp folder) and are removed; nothing else is written.
    """
    model_path = Path(model_path)
    check_source(model_path)
    reader = reader_for(model_path, images)
    with tempfile.TemporaryDirectory(prefix="lathe-quantize-", dir=workdir) as tmp:
        pre, cache, out = Path(tmp) / "pre.onnx", Path(tmp) / "calibration.json", Path(tmp) / "model.onnx"
        pre_process(model_path, pre)
        calibrate(pre, reader, cfg, cache)
        try:
            with _quiet():
                quantize_static(
                    str(pre), str(out), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZABLE_OPS,
                    per_channel=cfg.per_channel, reduce_range=REDUCE_RANGE,
                    activation_type=QUANT_TYPES[cfg.activation_type], weight_type=QUANT_TYPES[cfg.weight_type],
                    calibrate_method=CALIBRATION_METHODS[cfg.method], calibration_cache_path=str(cache),
                )
        except Exception as exc:
            raise LatheError(f"{model_path}: onnxruntime quantize_static failed: {type(exc).__name__}: {exc}") from exc
        if cfg.bias_correction or cfg.sequential_bias_correction:
            proto, float_proto = onnx.load(str(out)), onnx.load(str(pre))
            if cfg.bias_correction:
                correct_conv_biases(proto, float_proto, reader.batches())
            if cfg.sequential_bias_correction:
                correct_conv_output_means(proto, float_proto, reader.batches)
            onnx.save(proto, str(out))
        return _finish(out, metadata)


# ---------------------------------------------------------------------------------------------
# The whole step


def quantize_model(model_dir: Path, prepared_dir: Path, cfg: QuantizeParams) -> QuantizeResult:
    """Quantize `model_dir/model.onnx` calibrated on a seeded subset of the prepared train split.

    The record (quantize.json) holds the source model's sha256, the calibration sample ids (sorted)
    and their hash (`calibration_ids_sha256`), the settings, library versions, what got quantized
    (node-type counts, compute nodes left in float) and a float-vs-int8 comparison on the val split.
    Nothing is written.
    """
    model_path = Path(model_dir) / MODEL_FILE
    check_source(model_path)
    train_path = Path(prepared_dir) / f"{CALIBRATION_SPLIT}.safetensors"
    train = load_split(prepared_dir, CALIBRATION_SPLIT)
    channels, image_size = check_images(train["images"], train_path)
    session = load_session(model_path, threads=1)
    check_input(session, image_size, model_path, train_path, channels)
    fixed = input_spec(session)[1][0]
    batch = fixed if isinstance(fixed, int) and fixed > 0 else CALIBRATION_BATCH

    idx = calibration_indices(len(train["images"]), cfg.calibration_size, cfg.seed)
    ids = sorted(int(i) for i in train["sample_ids"][idx])
    ids_sha = calibration_ids_sha256(ids)
    source_sha = sha256_file(model_path)
    model_bytes = quantize_static_int8(model_path, train["images"][idx], cfg, metadata={
        SOURCE_SHA_KEY: source_sha, CALIBRATION_IDS_SHA_KEY: ids_sha,
    })

    val_path = Path(prepared_dir) / f"{CHECK_SPLIT}.safetensors"
    val_images = load_split(prepared_dir, CHECK_SPLIT)["images"]
    check_images(val_images, val_path)
    with tempfile.TemporaryDirectory(prefix="lathe-quantize-") as tmp:
        q_path = Path(tmp) / MODEL_FILE
        q_path.write_bytes(model_bytes)
        check = compare_with_float(q_path, model_path, val_images)
    proto = onnx.load_from_string(model_bytes)
    record = {
        "source": {"file": MODEL_FILE, "sha256": source_sha},
        "calibration": {
            "split": CALIBRATION_SPLIT, "seed": cfg.seed, "size": cfg.calibration_size,
            "n_split": int(len(train["images"])), "sample_ids": ids, "sample_ids_sha256": ids_sha,
            "method": cfg.method, "options": calibrator_options(cfg), "batch": batch,
            # part of quantize.json's bytes: names to_input's module as first written (it is now lathe.measure.ort)
            "preprocessing": "uint8 / 255 -> (N, C, S, S) float32 (lathe.evaluate.to_input)",
        },
        "quantization": {
            "format": "QDQ", "quant_pre_process": True, "per_channel": cfg.per_channel, "reduce_range": REDUCE_RANGE,
            "range_bits": RANGE_BITS, "bias_correction": cfg.bias_correction,
            "sequential_bias_correction": cfg.sequential_bias_correction,
            "activation_type": cfg.activation_type, "weight_type": cfg.weight_type, "op_types": QUANTIZABLE_OPS,
        },
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "numerics": numerics_record(),
        "node_types": node_type_counts(proto),
        "float_compute_nodes": float_compute_nodes(proto),
        "check_vs_float": {"split": CHECK_SPLIT, **check},
        "model_sha256": sha256_bytes(model_bytes),
        "size_bytes": len(model_bytes),
    }
    return QuantizeResult(model_bytes=model_bytes, record=record)


def write_quantized(out_dir: Path, result: QuantizeResult) -> None:
    """Atomically write model.onnx and (last) quantize.json into `out_dir`."""
    out_dir = Path(out_dir)
    write_bytes(out_dir / MODEL_FILE, result.model_bytes)
    write_json(out_dir / RECORD_FILE, result.record)
