"""onnxruntime session helpers and ONNX model facts, shared by every step that judges a model.

Facts from the file alone (`model_files`, `model_size_bytes`, `count_onnx_params`, `count_onnx_macs`)
and running it on the CPU (`load_session`, `predict`, `measure_latency`, `measure_throughput`). Every
variant is judged from its deployable artifact only: `model.onnx` plus any external-data files it
references. Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
import onnxruntime as ort

from lathe.errors import DataError, LatheError

MODEL_FILE = "model.onnx"
# Batch for the quality pass: fixed in code (not taken from throughput_batch) so that a speed knob
# can never change the quality numbers.
PREDICT_BATCH = 64
LATENCY_SEED = 0  # the synthetic image used for timing

# Ops whose constant inputs are learned parameters, and at which input slots (weight, bias, ...).
# Covers float and QDQ graphs (where the slot is fed by DequantizeLinear) and the QOperator form.
PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2),  # scale and shift only; running mean/var are buffers, as in torch
    "QLinearConv": (3, 8), "ConvInteger": (1,), "QLinearMatMul": (0, 3), "MatMulInteger": (0, 1),
}
# Ops that carry a constant through unchanged in value count (followed back when tracing a weight).
PASS_THROUGH = {"DequantizeLinear", "Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
# Ops whose multiply-accumulates are counted: conv-like (out_elems * w[1:]) and matmul-like (out_elems * K).
CONV_WEIGHT_SLOT = {"Conv": 1, "QLinearConv": 3, "ConvInteger": 1}
MATMUL_A_SLOT = {"MatMul": 0, "QLinearMatMul": 0, "MatMulInteger": 0}


# ---------------------------------------------------------------------------------------------
# Files


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph (initializers, Constant values), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors(g)


def load_proto(onnx_path: Path, external_data: bool = False) -> onnx.ModelProto:
    """The model graph, by default without its external weight data (dims only); errors name the file.

    Load external data only after `model_files` has checked where it lives.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise LatheError(f"{onnx_path}: model file not found (the stage that makes this variant should write it)")
    try:
        return onnx.load(str(onnx_path), load_external_data=external_data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise LatheError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc


def model_files(onnx_path: Path) -> list[Path]:
    """`onnx_path` plus every external-data file it references (sorted, unique).

    External data must live inside the model's folder: a reference that is absolute, climbs out
    with `..` or resolves (via symlinks) outside the folder is refused, as is a missing file.
    """
    onnx_path = Path(onnx_path)
    proto = load_proto(onnx_path)
    folder = onnx_path.parent.resolve()
    extra: set[Path] = set()
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        rel = PurePosixPath(location.replace("\\", "/"))
        if not location or rel.is_absolute() or ".." in rel.parts:
            raise LatheError(f"{onnx_path}: tensor {tensor.name!r} keeps its data at {location!r}, "
                             f"outside the model folder {onnx_path.parent}; external data must sit beside the model")
        path = onnx_path.parent / rel
        if not path.resolve().is_relative_to(folder):
            raise LatheError(f"{onnx_path}: external data {location!r} resolves outside {onnx_path.parent}")
        if not path.is_file():
            raise LatheError(f"{onnx_path}: external data file {path} is missing")
        extra.add(path)
    return [onnx_path, *sorted(extra)]


def model_size_bytes(onnx_path: Path) -> int:
    """Bytes on disk of everything the model needs to run (see `model_files`)."""
    return sum(p.stat().st_size for p in model_files(onnx_path))


# ---------------------------------------------------------------------------------------------
# Graph statistics


def _constants(graph: onnx.GraphProto) -> dict[str, int]:
    """Name -> element count of every constant tensor (initializers and Constant nodes)."""
    out = {t.name: math.prod(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for attr in node.attribute:
            if attr.name == "value":
                out[node.output[0]] = math.prod(attr.t.dims)
            elif attr.name in ("value_float", "value_int"):
                out[node.output[0]] = 1
            elif attr.name in ("value_floats", "value_ints"):
                out[node.output[0]] = len(attr.floats) or len(attr.ints)
    return out


def count_onnx_params(model: onnx.ModelProto) -> int:
    """Learned parameters: elements of the constants that feed a weight/bias slot of a layer.

    A constant counts when it reaches a slot listed in PARAM_SLOTS (Conv/Gemm/MatMul weight and
    bias, BatchNormalization scale and shift, and their QOperator forms), possibly through
    DequantizeLinear or value-preserving ops (PASS_THROUGH). In a QDQ graph that is the int8
    weight and int32 bias feeding DequantizeLinear input 0; scales and zero-points (inputs 1, 2)
    are never followed, so a float model and its QDQ version count the same. Shape constants,
    activation quantization params and running statistics are not parameters. A constant shared
    by several layers counts once. Not counted: constants that enter through other ops (e.g. a
    bias added with a separate Add after MatMul).
    """
    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()

    def trace(name: str) -> None:
        seen = set()
        while name and name not in seen:
            seen.add(name)
            if name in constants:
                found.add(name)
                return
            node = producer.get(name)
            if node is None or node.op_type not in PASS_THROUGH or not node.input:
                return
            name = node.input[0]

    for node in graph.node:
        for slot in PARAM_SLOTS.get(node.op_type, ()):
            if slot < len(node.input):
                trace(node.input[slot])
    return int(sum(constants[n] for n in found))


def _bind_input_shape(model: onnx.ModelProto, image_size: int) -> tuple[onnx.ModelProto, int]:
    """A copy with the image input's symbolic dims bound to (1, C, S, S); returns (copy, batch)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    initializers = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise LatheError(f"expected one image input, the graph has {len(inputs)}: {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise LatheError(f"input {inputs[0].name!r} has rank {len(dims)}, expected (N, C, S, S)")
    binding: dict[str, int] = {}
    for i, want in ((0, 1), (2, image_size), (3, image_size)):
        d = dims[i]
        if d.HasField("dim_value"):
            if i > 0 and d.dim_value != image_size:
                raise LatheError(f"input {inputs[0].name!r} expects {dims[2].dim_value}x{dims[3].dim_value} "
                                 f"images, not {image_size}x{image_size}")
            continue
        if d.dim_param:
            binding[d.dim_param] = want
        d.dim_value = want
    batch = dims[0].dim_value
    # The same symbol (e.g. "batch") appears on the outputs and any stored value_info: bind it there too.
    for vi in [*m.graph.output, *m.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in binding:
                d.dim_value = binding[d.dim_param]
    del m.graph.value_info[:]
    return m, batch


def count_onnx_macs(model: onnx.ModelProto, image_size: int) -> int:
    """Multiply-accumulates for one (1, C, S, S) image, from ONNX shape inference.

    Conv (and QLinearConv/ConvInteger): out_elems * (Cin / groups) * kH * kW, i.e. out_elems times
    the weight's trailing dims. Gemm/MatMul (and integer forms): out_elems * K. Everything else
    (pooling, adds, activations, Q/DQ) is not counted. Works for float and QDQ graphs alike: the
    weight shape is read from whatever tensor feeds the slot (a DequantizeLinear output in QDQ).
    """
    bound, batch = _bind_input_shape(model, image_size)
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise LatheError(f"ONNX shape inference failed, cannot count MACs: {exc}") from exc
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        shape = vi.type.tensor_type.shape
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]

    def shape_of(name: str, node: onnx.NodeProto) -> list[int]:
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise LatheError(f"cannot count MACs: shape of {name!r} (node {node.name or node.op_type}) is unknown "
                             "after shape inference")
        return s  # type: ignore[return-value]

    total = 0
    for node in g.node:
        op = node.op_type
        if op in CONV_WEIGHT_SLOT:
            out = shape_of(node.output[0], node)
            w = shape_of(node.input[CONV_WEIGHT_SLOT[op]], node)
            total += math.prod(out) * math.prod(w[1:])
        elif op == "Gemm":
            out, a = shape_of(node.output[0], node), shape_of(node.input[0], node)
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += math.prod(out) * (a[0] if trans_a else a[1])
        elif op in MATMUL_A_SLOT:
            out, a = shape_of(node.output[0], node), shape_of(node.input[MATMUL_A_SLOT[op]], node)
            total += math.prod(out) * a[-1]
    # A model with a fixed batch > 1 computes that many images per call; report per image.
    return int(total // max(batch, 1))


# ---------------------------------------------------------------------------------------------
# Running the model


def load_session(onnx_path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session: `threads` intra-op threads, 1 inter-op thread, sequential execution."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.use_deterministic_compute = True
    opts.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises a family of pybind error types
        raise LatheError(f"{onnx_path}: onnxruntime cannot load the model: {exc}") from exc


def input_spec(session: ort.InferenceSession) -> tuple[str, list[int | str | None]]:
    """(name, shape) of the model's single input; symbolic dims are strings or None."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LatheError(f"expected one image input, the model has {len(inputs)}: {[i.name for i in inputs]}")
    return inputs[0].name, list(inputs[0].shape)


def check_input(session: ort.InferenceSession, image_size: int, model_path: Path, data_path: Path,
                channels: int = 1) -> None:
    """The model must take float (N, C, S, S) with C and S those of the prepared images."""
    name, shape = input_spec(session)
    dtype = session.get_inputs()[0].type
    if dtype != "tensor(float)" or len(shape) != 4:
        raise LatheError(f"{model_path}: input {name!r} is {dtype} {shape}; expected float (N, {channels}, S, S)")
    if isinstance(shape[1], int) and shape[1] != channels:
        raise LatheError(f"{model_path}: input {name!r} has {shape[1]} channel(s); the prepared images have {channels}")
    h, w = shape[2], shape[3]
    if any(isinstance(d, int) and d != image_size for d in (h, w)):
        raise LatheError(f"{model_path}: input {name!r} expects {h}x{w} images but {data_path} holds "
                         f"{image_size}x{image_size}; train and evaluate with the same ingest.image_size")


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The model's fixed batch dimension, or None when the batch dimension is dynamic."""
    dim = input_spec(session)[1][0]
    return dim if isinstance(dim, int) and dim > 0 else None


def to_input(images_uint8: np.ndarray) -> np.ndarray:
    """(N, S, S) or (N, C, S, S) uint8 -> (N, C, S, S) float32 in [0, 1], the models' input contract."""
    x = images_uint8.astype(np.float32) / 255.0
    return x[:, None, :, :] if x.ndim == 3 else x


def predict(session: ort.InferenceSession, images_uint8: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Logits (N, num_classes) float32 for (N, S, S) or (N, C, S, S) uint8 images, run in chunks of `batch`.

    A model with a fixed batch dimension is fed chunks of exactly that size (the tail zero-padded).
    """
    name = input_spec(session)[0]
    fixed = fixed_batch(session)
    step = fixed or batch
    outs = []
    for start in range(0, len(images_uint8), step):
        x = to_input(images_uint8[start : start + step])
        n = len(x)
        if fixed and n < fixed:
            x = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), np.float32)])
        outs.append(np.asarray(session.run(None, {name: x})[0])[:n])
    if not outs:
        raise DataError("no images to predict")
    logits = np.concatenate(outs)
    if logits.ndim != 2 or len(logits) != len(images_uint8):
        raise LatheError(f"model output has shape {logits.shape}; expected (N, num_classes) logits")
    return logits.astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: max subtracted)."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def timing_input(session: ort.InferenceSession, image_size: int, batch: int) -> dict[str, np.ndarray]:
    """A feed of `batch` seeded (C, S, S) float32 images for timing: the same pixels for every model."""
    name, shape = input_spec(session)
    channels = shape[1] if isinstance(shape[1], int) else 1
    rng = np.random.default_rng(LATENCY_SEED)
    return {name: rng.random((batch, channels, image_size, image_size), dtype=np.float32)}


def time_calls(session: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int, runs: int) -> np.ndarray:
    """Seconds of each of `runs` timed calls with `feed`, after `warmup` untimed ones. Shape (runs,)."""
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times[i] = time.perf_counter() - t0
    return times


def measure_latency(session: ort.InferenceSession, image_size: int, warmup: int, runs: int) -> tuple[float, float]:
    """(p50, p95) milliseconds of single-image calls, after `warmup` untimed calls."""
    times = time_calls(session, timing_input(session, image_size, fixed_batch(session) or 1), warmup, runs)
    p50, p95 = np.percentile(times * 1000.0, [50, 95])
    return float(p50), float(p95)


def measure_throughput(session: ort.InferenceSession, image_size: int, batch: int, runs: int) -> float:
    """Images per second at `batch` images per call: median over `runs` timed calls (one warm-up).

    A model with a fixed batch dimension is timed at that batch instead.
    """
    batch = fixed_batch(session) or batch
    feed = timing_input(session, image_size, batch)
    session.run(None, feed)
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        rates.append(batch / max(time.perf_counter() - t0, 1e-9))
    return float(np.median(rates))
