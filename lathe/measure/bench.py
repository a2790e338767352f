"""`make bench`: the pipeline's INT8 variants against the FP32 teacher and what a user would do instead.

One run, one machine, one test split. Every model is judged from its ONNX file through onnxruntime:
quality with `lathe.measure.ort.predict` and `lathe.measure.evaluate.quality_metrics` (the evaluate stage's
numbers), size, params and MACs with the evaluate stage's counters, and latency measured here with all
models interleaved round-robin so that drift of the machine (clock, noisy neighbours) hits every model alike.

This module runs the measurement (`run_bench`), makes the rows and judges the acceptance criteria. The
timing and the physical floor are in `lathe.measure.bench_timing`, the baselines it compares against in
`lathe.measure.bench_baselines`, bench.md in `lathe.measure.bench_report`.

Nothing here knows about argv or params files; `bench/run.py` is the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lathe.data.contract import read_task
from lathe.data.ingest import image_geometry, load_split
from lathe.errors import DataError, LatheError
from lathe.measure.bench_timing import (
    MATMUL_OP,
    MATMUL_SHAPES,
    bench_timing_method,
    int8_matmul_throughput,
    interleaved_latency,
    machine_info,
    physical_floor,
)
from lathe.measure.compare import qat_ptq_pairs
from lathe.measure.evaluate import quality_metrics
from lathe.measure.intervals import Cells, cells_of, intervals, paired
from lathe.measure.ort import (
    check_input,
    count_onnx_macs,
    count_onnx_params,
    load_proto,
    load_session,
    model_size_bytes,
    predict,
)
from lathe.measure.params import BenchParams

log = logging.getLogger(__name__)

Role = Literal["teacher", "pipeline", "baseline"]
ROLES: tuple[Role, ...] = ("teacher", "pipeline", "baseline")
# bench.json rows carry exactly these keys (accuracy and recall as fractions, sizes in bytes).
ROW_KEYS = ("name", "role", "size_bytes", "accuracy", "defective_recall", "latency_p50_ms", "latency_p95_ms",
            "params", "macs")
EPS = 1e-9  # float slack when comparing measured ratios/drops with targets
JUDGED = ("accuracy", "defective_recall")  # the quality figures the bench reports, with intervals
# Pipeline variants are named by their folder under models/ (bench/run.py), as in compare: quantized/x and
# qat/x are the post-training and quantization-aware INT8 of float variant x (lathe.measure.compare.qat_ptq_pairs).


@dataclass(frozen=True)
class BenchModel:
    """One model in the benchmark: its display name, role, ONNX file and how it was made."""

    name: str
    role: Role
    onnx_path: Path
    origin: str = ""


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


def add_paired(rows: Sequence[dict[str, Any]], cells: Mapping[str, Cells]) -> None:
    """Each pipeline row's paired comparison (lathe.measure.intervals) with the teacher and every
    baseline, on the same test cells: row["paired"][other] = {metric: {diff_pt, ci95_pt, p_value}}."""
    others = [r["name"] for r in rows if r["role"] in ("teacher", "baseline")]
    for r in rows:
        if r["role"] != "pipeline":
            continue
        r["paired"] = {}
        for o in others:
            r["paired"][o] = {m: d.points() for m, d in paired(cells[r["name"]], cells[o]).items() if m in JUDGED}


def add_intervals(rows: Sequence[dict[str, Any]], cells: Mapping[str, Cells]) -> None:
    """Each row's JUDGED figures with their 95% bootstrap interval: row["ci95"][metric] = [low, high]."""
    for r in rows:
        found = intervals(cells[r["name"]])
        r["ci95"] = {m: [round(found[m].low, 6), round(found[m].high, 6)] for m in JUDGED}


def qat_vs_ptq(rows: Sequence[Mapping[str, Any]], cells: Mapping[str, Cells]) -> list[dict[str, Any]]:
    """Each QAT variant against the post-training INT8 variant of the same float model (qat/x against
    quantized/x), paired on the same test cells: [{"qat", "ptq", "paired": {metric: {diff_pt, ci95_pt,
    p_value}}}], QAT minus PTQ."""
    out = []
    for name, ptq in qat_ptq_pairs(r["name"] for r in rows if r["role"] == "pipeline"):
        diffs = paired(cells[name], cells[ptq])
        out.append({"qat": name, "ptq": ptq, "paired": {m: diffs[m].points() for m in JUDGED}})
    return out


def _criterion(name: str, value: float | None, target: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(value, 4), "target": target,
            "passed": bool(passed), "detail": detail}


def drop_pt(variant: Mapping[str, Any], other: Mapping[str, Any], metric: str) -> tuple[float, str]:
    """(other - variant) in points at the unfavourable end, and how it was judged. With the paired
    comparison run_bench records (row["paired"][other name]) that is the upper end of the 95% interval
    of the drop on the same test cells; without it (rows built by hand), the point difference."""
    d = (variant.get("paired") or {}).get(other["name"], {}).get(metric)
    if d is None:
        point = 100.0 * (other[metric] - variant[metric])
        return point, f"{point:+.2f} pt (single figures, no interval)"
    lo, hi = d["ci95_pt"]
    return -lo, (f"drop {-d['diff_pt']:+.2f} pt, 95% interval of the drop {-hi:+.2f} to {-lo:+.2f} pt, "
                 f"p={d['p_value']:.2g} (paired, same test cells)")


def check_variant(variant: Mapping[str, Any], teacher: Mapping[str, Any], baselines: Sequence[Mapping[str, Any]],
                  cfg: BenchParams) -> list[dict[str, Any]]:
    """The five acceptance criteria for one pipeline variant against the FP32 teacher and the baselines.

    size_ratio = teacher bytes / variant bytes; latency_ratio = teacher p50 / variant p50;
    drops are (teacher - variant) in percentage points at the upper end of their paired 95% interval
    (drop_pt); "beats every baseline" means for each baseline: strictly smaller and strictly faster (p50),
    and accuracy not worse than the baseline's by more than max_accuracy_drop_pt at that end.
    """
    size_ratio = teacher["size_bytes"] / variant["size_bytes"] if variant["size_bytes"] else None
    latency_ratio = teacher["latency_p50_ms"] / variant["latency_p50_ms"] if variant["latency_p50_ms"] else None
    acc_drop, acc_how = drop_pt(variant, teacher, "accuracy")
    recall_drop, recall_how = drop_pt(variant, teacher, "defective_recall")
    lost = []
    for b in baselines:
        why = [what for what, ok in (
            ("size", variant["size_bytes"] < b["size_bytes"]),
            ("p50 latency", variant["latency_p50_ms"] < b["latency_p50_ms"]),
            ("accuracy", drop_pt(variant, b, "accuracy")[0] <= cfg.max_accuracy_drop_pt + EPS),
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
                   acc_drop <= cfg.max_accuracy_drop_pt + EPS, acc_how),
        _criterion("defective_recall_drop_pt", recall_drop, f"<= {cfg.max_recall_drop_pt:g} pt",
                   recall_drop <= cfg.max_recall_drop_pt + EPS, recall_how),
        _criterion("beats_every_baseline", None,
                   f"smaller and faster, accuracy not worse by > {cfg.max_accuracy_drop_pt:g} pt", beats, detail),
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
    """Measure every model; returns the report {"rows", "floor", "acceptance", "qat_vs_ptq", "setup"} (see bench_markdown)."""
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

    sessions, stats, quality, cells = {}, {}, {}, {}
    for m in models:
        log.info("%-28s %-8s quality on %d test images (%s)", m.name, m.role, len(labels), m.onnx_path)
        stats[m.name] = model_stats(m.onnx_path, image_size)
        session = load_session(m.onnx_path, cfg.threads)
        check_input(session, image_size, m.onnx_path, split_path, channels)
        logits = predict(session, images)
        q = quality_metrics(labels, logits, task)
        quality[m.name] = {"accuracy": q["accuracy"], "defective_recall": q["defective_recall"]}
        cells[m.name] = cells_of(labels, np.argmax(logits, axis=1), task.defective_indices, task.num_classes)
        sessions[m.name] = session
    log.info("timing %d models round-robin: %d warm-up + %d timed rounds, %d thread(s)", len(models), cfg.warmup,
             cfg.runs, cfg.threads)
    latency = interleaved_latency(sessions, image_size, cfg.warmup, cfg.runs)
    log.info("measuring int8 matmul throughput (%d shapes x %d calls)", len(MATMUL_SHAPES), cfg.matmul_repeats)
    rate = int8_matmul_throughput(cfg.threads, MATMUL_SHAPES, cfg.matmul_repeats)
    rows = bench_rows(models, stats, quality, latency)
    add_paired(rows, cells)
    add_intervals(rows, cells)
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
    return {"rows": rows, "floor": floor, "acceptance": acceptance_check(rows, cfg), "qat_vs_ptq": qat_vs_ptq(rows, cells),
            "setup": setup}
