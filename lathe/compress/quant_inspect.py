"""What got quantized: node types of a quantized graph, compute layers left in float, the graph
onnxruntime actually runs, and agreement of the quantized model with its float source.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lathe.errors import LatheError
from lathe.measure.ort import load_session, predict

# Layers whose arithmetic should run in int8 once quantized; reported when they stay float.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


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
