"""`make bench`: the pipeline's INT8 variants against the FP32 teacher and what a user would do instead.

One run, one machine, one test split. Every model is judged from its ONNX file through onnxruntime:
quality with `lathe.measure.evaluate.predict`/`quality_metrics` (the evaluate stage's numbers), size, params
and MACs with the evaluate stage's counters, and latency measured here with all models interleaved
round-robin so that drift of the machine (clock, noisy neighbours) hits every model alike.

Baselines (role "baseline"), what a user would do instead of the pipeline:
  - onnxruntime `quantize_dynamic` of the teacher (after `quant_pre_process`),
  - onnxruntime `quantize_static` of the teacher with its defaults (QDQ, int8 activations and
    weights, MinMax, per-tensor), calibrated on the same seeded train images as the quantize stage,
  - 50% channel pruning + fine-tune alone (made by the prune stage; its folder is passed in).
The two quantized ones come from `lathe.compress.quantize`'s helpers, imported lazily, with plain
onnxruntime calls as a fallback when that module is absent.

The physical floor: parameters at one byte each, and MACs at the int8 matrix-multiply rate
measured here. It ignores memory traffic, activations and non-matmul ops: a lower bound, not a target.

Nothing here knows about argv or params files; `bench/run.py` is the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lathe.data.contract import read_task
from lathe.data.ingest import image_geometry, load_split
from lathe.errors import DataError, LatheError
from lathe.io import write_bytes
from lathe.measure.compare import fmt_bytes, fmt_count, fmt_ms, fmt_pct
from lathe.measure.evaluate import (
    MODEL_FILE,
    check_input,
    count_onnx_macs,
    count_onnx_params,
    fixed_batch,
    load_proto,
    load_session,
    model_size_bytes,
    predict,
    quality_metrics,
    timing_input,
    to_input,
)
from lathe.measure.metrics import latency_method
from lathe.measure.params import BenchParams

log = logging.getLogger(__name__)

Role = Literal["teacher", "pipeline", "baseline"]
ROLES: tuple[Role, ...] = ("teacher", "pipeline", "baseline")
# bench.json rows carry exactly these keys (accuracy and recall as fractions, sizes in bytes).
ROW_KEYS = ("name", "role", "size_bytes", "accuracy", "defective_recall", "latency_p50_ms", "latency_p95_ms",
            "params", "macs")
# int8 GEMM shapes (M, K, N) of the probe: a 3x3 conv as im2col at three depths of a small CNN
# (32x32 map, 64 -> 64 ch; 16x16, 128 -> 128; 8x8, 256 -> 256). The fastest is the floor's rate.
MATMUL_SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 576, 64), (256, 1152, 128), (64, 2304, 256))
MATMUL_OP = "MatMulInteger (uint8 x int8 -> int32)"
BASELINE_DYNAMIC = "ort_dynamic_int8"
BASELINE_STATIC = "ort_static_int8_defaults"
BASELINE_PRUNED = "pruned50_finetune"
EPS = 1e-9  # float slack when comparing measured ratios/drops with targets


@dataclass(frozen=True)
class BenchModel:
    """One model in the benchmark: its display name, role, ONNX file and how it was made."""

    name: str
    role: Role
    onnx_path: Path
    origin: str = ""


# ---------------------------------------------------------------------------------------------
# Timing


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
    """A one-node graph: a (M, K) uint8 input times a constant (K, N) int8 weight -> (M, N) int32."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w")
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
        for _ in range(warmup):
            session.run(None, feed)
        times = np.empty(repeats)
        for i in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feed)
            times[i] = time.perf_counter() - t0
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


# ---------------------------------------------------------------------------------------------
# Rows and acceptance


def bench_rows(models: Sequence[BenchModel], stats: Mapping[str, Mapping[str, int]],
               quality: Mapping[str, Mapping[str, float]],
               latency: Mapping[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """One row per model, in `models` order, with exactly ROW_KEYS.

    stats[name]: size_bytes, params, macs; quality[name]: accuracy, defective_recall (fractions);
    latency[name]: (p50, p95) ms.
    """
    rows = []
    for m in models:
        if m.role not in ROLES:
            raise LatheError(f"model {m.name!r} has role {m.role!r}; expected one of {ROLES}")
        p50, p95 = latency[m.name]
        rows.append({
            "name": m.name, "role": m.role,
            "size_bytes": int(stats[m.name]["size_bytes"]),
            "accuracy": round(float(quality[m.name]["accuracy"]), 6),
            "defective_recall": round(float(quality[m.name]["defective_recall"]), 6),
            "latency_p50_ms": round(float(p50), 4), "latency_p95_ms": round(float(p95), 4),
            "params": int(stats[m.name]["params"]), "macs": int(stats[m.name]["macs"]),
        })
    return rows


def _criterion(name: str, value: float | None, target: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(value, 4), "target": target,
            "passed": bool(passed), "detail": detail}


def check_variant(variant: Mapping[str, Any], teacher: Mapping[str, Any], baselines: Sequence[Mapping[str, Any]],
                  cfg: BenchParams) -> list[dict[str, Any]]:
    """The five acceptance criteria for one pipeline variant against the FP32 teacher and the baselines.

    size_ratio = teacher bytes / variant bytes; latency_ratio = teacher p50 / variant p50;
    drops are (teacher - variant) in percentage points; "beats every baseline" means for each
    baseline: strictly smaller and strictly faster (p50) at equal-or-better accuracy.
    """
    size_ratio = teacher["size_bytes"] / variant["size_bytes"] if variant["size_bytes"] else None
    latency_ratio = teacher["latency_p50_ms"] / variant["latency_p50_ms"] if variant["latency_p50_ms"] else None
    acc_drop = 100.0 * (teacher["accuracy"] - variant["accuracy"])
    recall_drop = 100.0 * (teacher["defective_recall"] - variant["defective_recall"])
    lost = []
    for b in baselines:
        why = [what for what, ok in (
            ("size", variant["size_bytes"] < b["size_bytes"]),
            ("p50 latency", variant["latency_p50_ms"] < b["latency_p50_ms"]),
            ("accuracy", variant["accuracy"] >= b["accuracy"] - EPS),
        ) if not ok]
        if why:
            lost.append(f"{b['name']} (not better on {', '.join(why)})")
    if not baselines:
        beats, detail = False, "no baseline was measured, so nothing was beaten"
    else:
        beats = not lost
        detail = "loses to " + "; ".join(lost) if lost else f"beats {', '.join(b['name'] for b in baselines)}"
    return [
        _criterion("size_ratio", size_ratio, f">= {cfg.min_size_ratio:g}x",
                   size_ratio is not None and size_ratio >= cfg.min_size_ratio - EPS),
        _criterion("latency_ratio", latency_ratio, f">= {cfg.min_latency_ratio:g}x",
                   latency_ratio is not None and latency_ratio >= cfg.min_latency_ratio - EPS),
        _criterion("accuracy_drop_pt", acc_drop, f"<= {cfg.max_accuracy_drop_pt:g} pt",
                   acc_drop <= cfg.max_accuracy_drop_pt + EPS),
        _criterion("defective_recall_drop_pt", recall_drop, f"<= {cfg.max_recall_drop_pt:g} pt",
                   recall_drop <= cfg.max_recall_drop_pt + EPS),
        _criterion("beats_every_baseline", None, "smaller and faster at >= accuracy", beats, detail),
    ]


def acceptance_check(rows: Sequence[Mapping[str, Any]], cfg: BenchParams) -> dict[str, Any]:
    """Judge the best pipeline INT8 variant against the FP32 teacher (all numbers from `rows`).

    "Best" = the pipeline row passing the most criteria; ties go to higher accuracy, then lower p50.
    Returns {"teacher", "variant", "criteria": [{name, value, target, passed, detail}], "passed",
    "candidates": {pipeline name: criteria passed}}; "variant" is None (and passed False) when there
    is no teacher row or no pipeline row.
    """
    teachers = [r for r in rows if r["role"] == "teacher"]
    pipeline = [r for r in rows if r["role"] == "pipeline"]
    baselines = [r for r in rows if r["role"] == "baseline"]
    if len(teachers) != 1 or not pipeline:
        why = (f"expected exactly one teacher row, found {len(teachers)}" if len(teachers) != 1
               else "no pipeline INT8 variant was measured")
        return {"teacher": teachers[0]["name"] if len(teachers) == 1 else None, "variant": None,
                "criteria": [_criterion("setup", None, "one teacher and >= 1 pipeline variant", False, why)],
                "passed": False, "candidates": {}}
    teacher = teachers[0]
    judged = [(v, check_variant(v, teacher, baselines, cfg)) for v in pipeline]
    best, criteria = max(judged, key=lambda vc: (sum(c["passed"] for c in vc[1]), vc[0]["accuracy"],
                                                -vc[0]["latency_p50_ms"]))
    return {"teacher": teacher["name"], "variant": best["name"], "criteria": criteria,
            "passed": all(c["passed"] for c in criteria),
            "candidates": {v["name"]: sum(c["passed"] for c in cs) for v, cs in judged}}


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count() or 0, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__}


def _floor_note(f: Mapping[str, Any]) -> str:
    return (f"{MATMUL_OP}, shapes {', '.join('x'.join(map(str, s)) for s in f['matmul_shapes'])} (MxKxN), "
            f"median of {f['matmul_repeats']} calls each, fastest shape, {f['threads']} thread(s)")


def bench_timing_method(threads: int, runs: int, warmup: int) -> str:
    """How this benchmark times every model (lathe.measure.metrics.latency_method)."""
    return latency_method("`make bench`", threads, runs, warmup,
                          "all models interleaved round-robin in one process (order rotated every round)")


def bench_markdown(report: Mapping[str, Any]) -> str:
    """bench.md: the side-by-side table, the physical floor, and PASS/FAIL per acceptance criterion."""
    rows, floor, acc, setup = report["rows"], report["floor"], report["acceptance"], report["setup"]
    teacher = next((r for r in rows if r["role"] == "teacher"), None)
    machine = setup["machine"]
    lines = [
        "# Benchmark: pipeline INT8 vs the FP32 teacher and do-it-yourself baselines",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['platform']}; "
        f"onnxruntime {machine['onnxruntime']}, CPU provider, {setup['threads']} intra-op thread(s), batch 1.",
        f"Latency: {bench_timing_method(setup['threads'], setup['runs'], setup['warmup'])}. These are this "
        "benchmark's own figures: reports/compare.md and the model cards quote the evaluate stage's (each model "
        "timed alone, in its own stage run, with the evaluate params), so the two differ on the same machine.",
        f"Quality: the test split of `{setup['prepared_dir']}`, {setup['test_samples']} images of "
        f"{setup['image_size']}x{setup['image_size']} px; defective = {', '.join(setup['defective_classes'])}. "
        "1 KB = 1000 B.",
        "",
        "| model | role | size | vs teacher | accuracy | defective recall | p50 | p95 | speedup (p50) | params "
        "| MACs | floor size | floor p50 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = floor["models"][r["name"]]
        if teacher is None or r is teacher:
            size_vs, speed = "-", "-"
        else:
            size_vs = f"{teacher['size_bytes'] / r['size_bytes']:.1f}x smaller" if r["size_bytes"] else "n/a"
            speed = f"{teacher['latency_p50_ms'] / r['latency_p50_ms']:.2f}x" if r["latency_p50_ms"] else "n/a"
        lines.append(
            f"| {r['name']} | {r['role']} | {fmt_bytes(r['size_bytes'])} | {size_vs} | {fmt_pct(r['accuracy'])} "
            f"| {fmt_pct(r['defective_recall'])} | {fmt_ms(r['latency_p50_ms'])} | {fmt_ms(r['latency_p95_ms'])} "
            f"| {speed} | {fmt_count(r['params'])} | {fmt_count(r['macs'])} | {fmt_bytes(f['int8_param_bytes'])} "
            f"| {fmt_ms(f['latency_ms'])} |"
        )
    lines += [
        "",
        "## Physical floor",
        "",
        f"Measured int8 matrix-multiply throughput: **{floor['int8_macs_per_s'] / 1e9:.1f} GMAC/s** "
        f"({_floor_note(floor)}).",
        "Floor size = parameters at one byte each; floor p50 = MACs at that rate. Both ignore scales, graph, "
        "activations, memory traffic and non-matmul ops: lower bounds, not targets.",
        "",
    ]
    if acc["variant"] is None:
        lines += ["## Acceptance", "", f"**FAIL**: {acc['criteria'][0]['detail']}", ""]
    else:
        lines += [
            f"## Acceptance: {acc['variant']} vs {acc['teacher']}",
            "",
            "Best pipeline INT8 variant (most criteria passed, then accuracy, then p50): "
            + ", ".join(f"{n} {k}/5" for n, k in acc["candidates"].items()) + ".",
            "",
            "| criterion | measured | target | result |",
            "|---|---:|---|---|",
        ]
        units = {"size_ratio": "x", "latency_ratio": "x", "accuracy_drop_pt": " pt", "defective_recall_drop_pt": " pt"}
        for c in acc["criteria"]:
            measured = c["detail"] if c["value"] is None else f"{c['value']:.2f}{units.get(c['name'], '')}"
            lines.append(f"| {c['name']} | {measured} | {c['target']} | {'PASS' if c['passed'] else 'FAIL'} |")
        lines += ["", f"Overall: **{'PASS' if acc['passed'] else 'FAIL'}**", ""]
    lines += ["## How each model was made", ""]
    lines += [f"- **{name}**: {origin}" for name, origin in setup["origins"].items()]
    if setup["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in setup["notes"]]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Baselines


def calibration_subset(images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The train images the pipeline's quantize stage calibrates on for (`size`, `seed`), in split order.

    Uses `lathe.compress.quantize.calibration_indices` (imported lazily) so the static baseline sees exactly
    the pipeline's calibration images; without that module, the same draw is made here.
    """
    if len(images) == 0:
        raise DataError("the train split is empty; nothing to calibrate on")
    try:
        from lathe.compress.quantize import calibration_indices
    except ImportError:
        if not 1 <= size <= len(images):
            raise LatheError(f"calibration size {size} must be between 1 and the train split's {len(images)}")
        return images[np.sort(np.random.default_rng(seed).choice(len(images), size=size, replace=False))]
    return images[calibration_indices(len(images), size, seed)]


# Builders return the quantized model as bytes; `workdir` holds their temp files.
DynamicBuilder = Callable[[Path, Path], bytes]  # (float model.onnx, workdir)
StaticBuilder = Callable[[Path, np.ndarray, Path], bytes]  # (float model.onnx, calibration (N, S, S) uint8, workdir)


def _input_name(onnx_path: Path) -> str:
    graph = load_proto(onnx_path).graph
    initializers = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in initializers)


def _ort_dynamic(model_path: Path, workdir: Path) -> bytes:
    """Fallback without lathe.compress.quantize: quant_pre_process, then quantize_dynamic with its defaults."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = Path(workdir) / "dynamic.pre.onnx", Path(workdir) / "dynamic.onnx"
    quant_pre_process(str(model_path), str(pre))
    quantize_dynamic(str(pre), str(out))
    return out.read_bytes()


def _ort_static_defaults(model_path: Path, images: np.ndarray, workdir: Path) -> bytes:
    """Fallback without lathe.compress.quantize: quantize_static(model, out, reader) with its defaults, one image per call."""
    from onnxruntime.quantization import quantize_static

    feeds = iter([{_input_name(model_path): to_input(images[i : i + 1])} for i in range(len(images))])
    reader = type("Reader", (), {"get_next": lambda self: next(feeds, None), "rewind": lambda self: None})()
    out = Path(workdir) / "static.onnx"
    quantize_static(str(model_path), str(out), reader)
    return out.read_bytes()


def default_builders() -> tuple[DynamicBuilder, StaticBuilder, dict[str, str]]:
    """(dynamic, static, origin text per baseline name): lathe.compress.quantize's helpers, or plain onnxruntime.

    Imported lazily so the bench does not depend on the quantize module's presence.
    """
    try:
        from lathe.compress.quantize import quantize_dynamic_int8, quantize_static_defaults
    except ImportError:
        return _ort_dynamic, _ort_static_defaults, {
            BASELINE_DYNAMIC: "quant_pre_process, then onnxruntime quantize_dynamic with all defaults",
            BASELINE_STATIC: "onnxruntime quantize_static with all defaults (QDQ, int8 activations and weights, "
                             "per-tensor, MinMax), no pre-processing",
        }
    return (
        lambda model, workdir: quantize_dynamic_int8(model, workdir=workdir),
        lambda model, images, workdir: quantize_static_defaults(model, images, workdir=workdir),
        {
            BASELINE_DYNAMIC: "lathe.compress.quantize.quantize_dynamic_int8 defaults: quant_pre_process, then onnxruntime "
                              "quantize_dynamic (per-tensor int8 weights, activations quantized at run time)",
            BASELINE_STATIC: "lathe.compress.quantize.quantize_static_defaults: onnxruntime quantize_static(model, out, reader) "
                             "with its defaults (QDQ, int8 activations and weights, per-tensor, MinMax), "
                             "no pre-processing",
        },
    )


def build_baselines(teacher_onnx: Path, work_dir: Path, calibration: np.ndarray,
                    dynamic: DynamicBuilder | None = None, static: StaticBuilder | None = None) -> list[BenchModel]:
    """Dynamic and default-static INT8 versions of the teacher, written to `work_dir/<name>/model.onnx`.

    `calibration` (N, S, S) uint8 feeds the static one. Builders default to `default_builders()`.
    """
    default_dynamic, default_static, origins = default_builders()
    if dynamic is not None or static is not None:
        origins = {k: f"{v} (custom builder)" for k, v in origins.items()}
    dynamic, static = dynamic or default_dynamic, static or default_static
    work_dir = Path(work_dir)
    models = []
    for name, build in ((BASELINE_DYNAMIC, lambda wd: dynamic(teacher_onnx, wd)),
                        (BASELINE_STATIC, lambda wd: static(teacher_onnx, calibration, wd))):
        folder = work_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        log.info("building baseline %s from %s", name, teacher_onnx)
        try:
            model_bytes = build(folder)
        except Exception as exc:  # LatheErrors too: say which baseline
            raise LatheError(f"building baseline {name} from {teacher_onnx} failed: {type(exc).__name__}: {exc}"
                             ) from exc
        write_bytes(folder / MODEL_FILE, model_bytes)
        origin = f"{teacher_onnx} -> {origins[name]}"
        if name == BASELINE_STATIC:
            origin += f"; calibrated on {len(calibration)} seeded train images (the quantize stage's)"
        models.append(BenchModel(name, "baseline", folder / MODEL_FILE, origin))
    return models


PRUNE_RECORD = "prune.json"  # what the prune stage writes beside its model


def describe_pruned_baseline(model_dir: Path) -> tuple[str, str | None]:
    """(origin text, note or None) for the "50% channel pruning + fine-tune" folder.

    Reads the prune stage's prune.json when present: a record saying anything other than
    target "channels" at ratio 0.5 yields a note (the row is still measured, under its name).
    """
    record_path = Path(model_dir) / PRUNE_RECORD
    base = f"{Path(model_dir) / MODEL_FILE}: channel pruning of the teacher + fine-tune alone (prune stage), FP32"
    if not record_path.is_file():
        return f"{base}; no {PRUNE_RECORD} beside it, so the 50% channel ratio is taken on trust", None
    try:
        record = json.loads(record_path.read_text())
        target, ratio = record["target"], float(record["ratio"])
        removed = float(record.get("channels_removed", float("nan")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return base, f"{record_path}: unreadable ({type(exc).__name__}: {exc}); cannot confirm 50% channel pruning"
    origin = f"{base}; {PRUNE_RECORD}: target {target}, ratio {ratio:g}, {100 * removed:.1f}% of channels removed"
    if target != "channels" or abs(ratio - 0.5) > 1e-9:
        return origin, (f"{BASELINE_PRUNED}: {record_path} says target={target}, ratio={ratio:g}, not 50% of "
                        "channels; make it with prune target: channels, ratio: 0.5")
    return origin, None


# ---------------------------------------------------------------------------------------------
# The whole run


def model_stats(onnx_path: Path, image_size: int) -> dict[str, int]:
    """size_bytes (model plus external data), params and MACs per image, as the evaluate stage counts them."""
    proto = load_proto(onnx_path, external_data=True)
    try:
        macs = count_onnx_macs(proto, image_size)
    except LatheError as exc:
        raise LatheError(f"{onnx_path}: {exc}") from exc
    return {"size_bytes": model_size_bytes(onnx_path), "params": count_onnx_params(proto), "macs": macs}


def run_bench(models: Sequence[BenchModel], prepared_dir: Path, cfg: BenchParams,
              notes: Sequence[str] = ()) -> dict[str, Any]:
    """Measure every model; returns the report {"rows", "floor", "acceptance", "setup"} (see bench_markdown)."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise LatheError(f"model names must be unique, got {names}")
    prepared_dir = Path(prepared_dir)
    split_path = prepared_dir / "test.safetensors"
    test, task = load_split(prepared_dir, "test"), read_task(prepared_dir)
    images, labels = test["images"], test["labels"].astype(np.int64)
    if len(labels) == 0:
        raise DataError(f"{split_path}: the test split is empty; nothing to measure")
    channels, image_size = image_geometry(images, split_path)

    sessions, stats, quality = {}, {}, {}
    for m in models:
        log.info("%-28s %-8s quality on %d test images (%s)", m.name, m.role, len(labels), m.onnx_path)
        stats[m.name] = model_stats(m.onnx_path, image_size)
        session = load_session(m.onnx_path, cfg.threads)
        check_input(session, image_size, m.onnx_path, split_path, channels)
        q = quality_metrics(labels, predict(session, images), task)
        quality[m.name] = {"accuracy": q["accuracy"], "defective_recall": q["defective_recall"]}
        sessions[m.name] = session
    log.info("timing %d models round-robin: %d warm-up + %d timed rounds, %d thread(s)", len(models), cfg.warmup,
             cfg.runs, cfg.threads)
    latency = interleaved_latency(sessions, image_size, cfg.warmup, cfg.runs)
    log.info("measuring int8 matmul throughput (%d shapes x %d calls)", len(MATMUL_SHAPES), cfg.matmul_repeats)
    rate = int8_matmul_throughput(cfg.threads, MATMUL_SHAPES, cfg.matmul_repeats)
    rows = bench_rows(models, stats, quality, latency)
    floor = {
        "int8_macs_per_s": round(rate, 1), "op": MATMUL_OP, "threads": cfg.threads,
        "matmul_shapes": [list(s) for s in MATMUL_SHAPES], "matmul_repeats": cfg.matmul_repeats,
        "models": {r["name"]: physical_floor(r["params"], r["macs"], rate) for r in rows},
    }
    setup = {
        "machine": machine_info(), "threads": cfg.threads, "warmup": cfg.warmup, "runs": cfg.runs, "batch": 1,
        "timing_method": bench_timing_method(cfg.threads, cfg.runs, cfg.warmup),
        "prepared_dir": str(prepared_dir), "test_samples": int(len(labels)), "image_size": image_size,
        "defective_classes": list(task.defective), "origins": {m.name: m.origin or str(m.onnx_path) for m in models},
        "notes": list(notes),
    }
    return {"rows": rows, "floor": floor, "acceptance": acceptance_check(rows, cfg), "setup": setup}
