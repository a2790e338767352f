"""Timing for `make bench`: all models interleaved round-robin, and the physical floor.

The physical floor: parameters at one byte each, and MACs at the int8 matrix-multiply rate
measured here. It ignores memory traffic, activations and non-matmul ops: a lower bound, not a target.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lathe.determinism import cpu_model
from lathe.errors import LatheError
from lathe.measure.metrics import latency_method
from lathe.measure.ort import fixed_batch, time_calls, timing_input

# int8 GEMM shapes (M, K, N) of the probe: a 3x3 conv as im2col at three depths of a small CNN
# (32x32 map, 64 -> 64 ch; 16x16, 128 -> 128; 8x8, 256 -> 256). The fastest is the floor's rate.
MATMUL_SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 576, 64), (256, 1152, 128), (64, 2304, 256))
MATMUL_OP = "MatMulInteger (uint8 x int8 -> int32)"


def interleaved_latency(sessions: Mapping[str, ort.InferenceSession], image_size: int, warmup: int,
                        runs: int) -> dict[str, tuple[float, float]]:
    """(p50, p95) milliseconds per model of single-image calls, timed round-robin.

    Each round calls every model once; the order rotates by one each round so no model always
    runs first (cold caches) or last. `warmup` untimed rounds come first, then `runs` timed ones,
    so every model gets exactly `runs` timed calls.
    """
    if not sessions:
        raise LatheError("no models to time")
    if runs < 1 or warmup < 0:
        raise LatheError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    names = list(sessions)
    # one seeded image per call (or the model's fixed batch of them): the same pixels for every model
    feeds = {n: timing_input(sessions[n], image_size, fixed_batch(sessions[n]) or 1) for n in names}
    times = {n: np.empty(runs) for n in names}  # seconds
    for r in range(warmup + runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            session, feed = sessions[name], feeds[name]
            t0 = time.perf_counter()
            session.run(None, feed)
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name][r - warmup] = elapsed
    out = {}
    for name in names:
        p50, p95 = np.percentile(times[name] * 1000.0, [50, 95])
        out[name] = (float(p50), float(p95))
    return out


def int8_matmul_model(m: int, k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    """A one-node graph: a (M, K) uint8 input times a constant (K, N) int8 weight -> (M, N) int32.

    The weights are 7-bit (-64..63), as the pipeline's INT8 models' (quantize with reduce_range): CPUs
    without VNNI add uint8 x int8 pairs in saturating 16 bits, and 255 * 127 * 2 overflows there (an AMD
    EPYC returned wrong sums), 255 * 64 * 2 does not. So the probe times the models' kernel path and is
    exact on every CPU."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.integers(-64, 64, (k, n), dtype=np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], [weight],
    )
    # ir_version 10 / opset 13: well inside what onnxruntime 1.31 loads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)


def int8_matmul_throughput(threads: int = 1, shapes: Sequence[tuple[int, int, int]] = MATMUL_SHAPES,
                           repeats: int = 50, warmup: int = 5) -> float:
    """Int8 multiply-accumulates per second on this machine through onnxruntime's int8 GEMM.

    Per shape: M*K*N MACs over the median of `repeats` timed calls; the fastest shape wins (the
    floor should be optimistic).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    best = 0.0
    for m, k, n in shapes:
        session = ort.InferenceSession(int8_matmul_model(m, k, n).SerializeToString(), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        feed = {"a": np.random.default_rng(1).integers(0, 256, (m, k), dtype=np.uint8)}
        times = time_calls(session, feed, warmup, repeats)
        best = max(best, m * k * n / max(float(np.median(times)), 1e-12))
    return best


def physical_floor(params: int, macs: int, int8_macs_per_s: float) -> dict[str, float | int]:
    """The smallest and fastest a model with `params` and `macs` could be here, at int8.

    int8_param_bytes: one byte per parameter (no scales, no graph); latency_ms: MACs at the
    measured int8 matmul rate (no memory traffic, no activations, no other ops).
    """
    if int8_macs_per_s <= 0:
        raise LatheError(f"int8 throughput must be positive, got {int8_macs_per_s}")
    return {"params": int(params), "macs": int(macs), "int8_param_bytes": int(params),
            "latency_ms": float(f"{1000.0 * macs / int8_macs_per_s:.6g}")}  # 6 significant digits


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 0, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__}


def bench_timing_method(threads: int, runs: int, warmup: int) -> str:
    """How this benchmark times every model (lathe.measure.metrics.latency_method)."""
    return latency_method("`make bench`", threads, runs, warmup,
                          "all models interleaved round-robin in one process (order rotated every round)")
