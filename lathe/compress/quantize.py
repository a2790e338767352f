"""INT8 quantization of an ONNX model with onnxruntime: static QDQ (the pipeline's), dynamic and
"onnxruntime defaults" (the bench's baselines).

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

Determinism: with the same model, images and settings the result is byte-identical, also across
processes and PYTHONHASHSEED values (checked). onnxruntime 1.31 writes no temp paths, random names
or timestamps into the model; it adds metadata `onnx.infer` / `onnx.quant.pre_process` (constant)
and we add `lathe.compress.quantize.*` keys, sorted.

Inputs are (N, S, S) uint8 images preprocessed with `lathe.measure.evaluate.to_input`, so calibration sees
exactly what evaluation and deployment feed the model. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from lathe.compress.params import QuantizeParams
from lathe.data.ingest import image_geometry, load_split
from lathe.determinism import numerics_record
from lathe.errors import ConfigError, DataError, LatheError
from lathe.io import sha256_bytes, sha256_file, write_bytes, write_json
from lathe.measure.evaluate import (
    MODEL_FILE,
    check_input,
    input_spec,
    load_proto,
    load_session,
    model_files,
    predict,
    to_input,
)
from lathe.model.export import set_metadata

# 7-bit weights: CPUs without VNNI (AVX2) multiply uint8 x int8 pairs with a saturating 16-bit add
# (vpmaddubsw), CPUs with VNNI/AMX do not; with 7 bits no pair saturates, so INT8 inference gives the
# same bits everywhere (measured: logits identical on AVX-512/AMX and emulated AVX2 Intel and AMD,
# 704 of 1024 logits apart without it).
REDUCE_RANGE = True
RANGE_BITS = 12  # calibration ranges snapped outward to 12 significant bits (snap_outward)
CALIBRATION_SPLIT = "train"
CHECK_SPLIT = "val"  # held-out images on which the quantized model is compared with the float one
RECORD_FILE = "quantize.json"
# Images per calibrator.collect_data call: bounds memory (the calibrator keeps every intermediate
# tensor of a call) and fixes how histograms are merged, so it is part of the result. (1,1,S,S)..(32,1,S,S).
CALIBRATION_BATCH = 32
ENTROPY_QUANTIZED_BINS = 128  # onnxruntime's own default for the simulated quantized histogram
QUANT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# The op types quantize_static quantizes when not told otherwise (sorted: the library builds them from a set).
QUANTIZABLE_OPS = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
# Layers whose arithmetic should run in int8 once quantized; reported when they stay float.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# What `quantize_static` uses when called with only (model, output, reader) in onnxruntime 1.31.
ORT_STATIC_DEFAULTS = {
    "quant_format": "QDQ", "activation_type": "qint8", "weight_type": "qint8", "per_channel": False,
    "reduce_range": False, "calibrate_method": "minmax", "quant_pre_process": False,
}


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model (one self-contained ONNX file) and the record written beside it."""

    model_bytes: bytes
    record: dict


# ---------------------------------------------------------------------------------------------
# Calibration data


def calibration_indices(n_train: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct positions in a split of `n_train` samples, drawn with `seed`, sorted (int64)."""
    if size > n_train:
        raise ConfigError(f"quantize.calibration_size = {size} is larger than the {CALIBRATION_SPLIT} split "
                          f"({n_train} samples); lower it to at most {n_train}")
    if size < 1:
        raise ConfigError(f"quantize.calibration_size = {size}; need at least 1 sample")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=size, replace=False)).astype(np.int64)


def calibration_ids_sha256(sample_ids: Sequence[int] | np.ndarray) -> str:
    """sha256 of the canonical id list: the ids sorted ascending, unique, each in decimal followed by
    "\\n", UTF-8. Reproducible in a shell: `jq -r '.calibration.sample_ids[]' quantize.json | sha256sum`."""
    ids = sorted({int(i) for i in np.asarray(sample_ids).ravel().tolist()})
    return sha256_bytes("".join(f"{i}\n" for i in ids).encode("utf-8"))


class ImageReader(CalibrationDataReader):
    """Feeds (n, 1, S, S) float32 batches of the given (N, S, S) uint8 images, in order.

    `batch` is the model's fixed batch size if it has one; N must then be a multiple of it
    (padding would calibrate on blank images).
    """

    def __init__(self, input_name: str, images_uint8: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        if len(images_uint8) == 0:
            raise DataError("no calibration images")
        self.input_name, self.images, self.batch = input_name, images_uint8, batch
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.images), self.batch):
            yield {self.input_name: to_input(self.images[start : start + self.batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.batches()


class _Single(CalibrationDataReader):
    """A reader over one feed (one collect_data call per batch)."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def reader_for(model_path: Path, images_uint8: np.ndarray) -> ImageReader:
    """An ImageReader with the model's input name and batch (fixed batch honoured, else CALIBRATION_BATCH)."""
    name, shape = input_spec(load_session(model_path, threads=1))
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if fixed and len(images_uint8) % fixed:
        raise ConfigError(f"{model_path} has a fixed batch of {fixed} but {len(images_uint8)} calibration images "
                          f"were given; use a quantize.calibration_size that is a multiple of {fixed}")
    return ImageReader(name, images_uint8, fixed or CALIBRATION_BATCH)


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
        return _finish(out, metadata)


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


# ---------------------------------------------------------------------------------------------
# What got quantized


def node_type_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """op_type -> number of nodes in the main graph, sorted by op_type (domain-qualified if not ONNX)."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)
    return dict(sorted(counts.items()))


def float_compute_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of Conv/Gemm/MatMul nodes left in float: data input or weight not fed by DequantizeLinear."""
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    left = []
    for n in proto.graph.node:
        if n.op_type in COMPUTE_OPS and any(producer.get(x) != "DequantizeLinear" for x in n.input[:2]):
            left.append(n.name or f"{n.op_type}({n.output[0]})")
    return sorted(left)


def runtime_node_types(model_bytes: bytes, threads: int = 1) -> dict[str, int]:
    """op_type counts of the graph onnxruntime actually runs on this machine (ORT_ENABLE_ALL).

    Shows which QDQ groups were fused into QLinearConv & co. and which stayed as float ops between
    DequantizeLinear/QuantizeLinear. Depends on the CPU (e.g. VNNI) and onnxruntime version: a
    diagnostic, not part of any recorded artifact.
    """
    with tempfile.TemporaryDirectory(prefix="lathe-quantize-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        return node_type_counts(onnx.load(opts.optimized_model_filepath))


def compare_with_float(quantized_path: Path, float_path: Path, images: np.ndarray) -> dict[str, float | int]:
    """Run both models on (N, S, S) uint8 images: argmax agreement and max |logit difference|.

    Raises if the quantized model's outputs are not all finite.
    """
    q = predict(load_session(quantized_path, threads=1), images)
    f = predict(load_session(float_path, threads=1), images)
    if not np.isfinite(q).all():
        raise LatheError(f"{quantized_path}: the quantized model outputs non-finite logits")
    return {
        "n": int(len(images)),
        "argmax_agreement": round(float((q.argmax(1) == f.argmax(1)).mean()), 6),
        # 4 decimals: the float model's logits differ in the last bit between AVX-512 and AVX2 kernels
        "max_abs_logit_diff": round(float(np.abs(q - f).max()), 4),
    }


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
        "lathe.compress.quantize.source_sha256": source_sha, "lathe.compress.quantize.calibration_ids_sha256": ids_sha,
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
            "preprocessing": "uint8 / 255 -> (N, C, S, S) float32 (lathe.measure.evaluate.to_input)",
        },
        "quantization": {
            "format": "QDQ", "quant_pre_process": True, "per_channel": cfg.per_channel, "reduce_range": REDUCE_RANGE,
            "range_bits": RANGE_BITS,
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
