import json

import numpy as np
import pytest

from lathe.errors import LatheError
from lathe.measure.compare import (
    METRIC_KEYS,
    build_comparison,
    compare_markdown,
    fmt_bytes,
    fmt_times,
    load_rows,
    pareto_front,
    pareto_png,
    qat_ptq_pairs,
    ratios_to,
)
from lathe.measure.metrics import HEADLINE_KEYS

# Realistic shapes: the DESIGN calibration numbers (teacher 4.95 MB / 1.27 ms, INT8 student 173 KB / 0.17 ms).
METRICS = {
    "teacher": dict(params=1_200_000, macs=40_000_000, size_bytes=4_950_000, accuracy=0.715, balanced_accuracy=0.52,
                    defective_recall=0.62, escape_rate=0.38, latency_p50_ms=1.27, latency_p95_ms=1.5,
                    throughput_ips=1500.0),
    "pruned": dict(params=400_000, macs=20_000_000, size_bytes=1_650_000, accuracy=0.70, balanced_accuracy=0.5,
                   defective_recall=0.6, escape_rate=0.4, latency_p50_ms=0.7, latency_p95_ms=0.9,
                   throughput_ips=2800.0),
    "student": dict(params=115_000, macs=6_000_000, size_bytes=470_000, accuracy=0.727, balanced_accuracy=0.53,
                    defective_recall=0.64, escape_rate=0.36, latency_p50_ms=0.4, latency_p95_ms=0.5,
                    throughput_ips=6000.0),
    "quantized/student": dict(params=115_000, macs=6_000_000, size_bytes=173_000, accuracy=0.729,
                              balanced_accuracy=0.53, defective_recall=0.63, escape_rate=0.37, latency_p50_ms=0.17,
                              latency_p95_ms=0.2, throughput_ips=9000.0),
}


TIMING = "evaluate stage: onnxruntime CPU, batch 1, 1 thread, p50/p95 of 300 calls after 20 warm-up calls, alone"


LABELS = np.random.default_rng(0).choice(4, size=654, p=[0.5, 0.2, 0.1, 0.2])


def predictions_for(accuracy: float) -> np.ndarray:
    """Predictions right on the first round(accuracy * 654) cells (so variants share most right cells)."""
    predicted = LABELS.copy()
    wrong = np.arange(len(LABELS)) >= round(accuracy * len(LABELS))
    predicted[wrong] = (LABELS[wrong] + 1) % 4
    return predicted


def write_metrics(reports, metrics=METRICS, timing=TIMING):
    """Reports as the evaluate stage lays them out (lathe.measure.reports): headline metrics.json, detail.json
    (with 95% intervals) and predictions.csv."""
    for name, m in metrics.items():
        full = {**m, "n_test": 654, "macro_f1": 0.4, "false_reject_rate": 0.1,
                "accuracy_ci95_low": m["accuracy"] - 0.03, "accuracy_ci95_high": m["accuracy"] + 0.03}
        (reports / name).mkdir(parents=True, exist_ok=True)
        (reports / name / "metrics.json").write_text(json.dumps({k: full[k] for k in HEADLINE_KEYS if k in full}))
        detail = {"metrics": {k: v for k, v in full.items() if k not in HEADLINE_KEYS},
                  "confusion_matrix": np.eye(4, dtype=int).tolist(), "timing_method": timing,
                  "defective_indices": [2, 3]}
        (reports / name / "detail.json").write_text(json.dumps(detail))
        predicted = predictions_for(m["accuracy"])
        (reports / name / "predictions.csv").write_text("sample_id,label,predicted,p_defective\n" + "".join(
            f"{i},{y},{p},0.5\n" for i, (y, p) in enumerate(zip(LABELS, predicted))))
    return reports


def rows_of(**points):
    """Rows from name=(x, y) pairs for Pareto tests."""
    return [{"name": n, "x": x, "y": y} for n, (x, y) in points.items()]


# --- loading ------------------------------------------------------------------------------------


def test_load_rows_keeps_order_and_only_the_row_metrics(tmp_path):
    rows = load_rows(write_metrics(tmp_path), ["quantized/student", "teacher"])
    assert [r["name"] for r in rows] == ["quantized/student", "teacher"]
    assert set(rows[0]) == {"name", *METRIC_KEYS, "timing_method", "ci95", "cells"}
    assert rows[0]["ci95"]["accuracy"] == [pytest.approx(0.699), pytest.approx(0.759)]
    assert rows[0]["escape_rate"] == METRICS["quantized/student"]["escape_rate"]  # from detail.json
    assert rows[1]["size_bytes"] == 4_950_000


def test_missing_metrics_file_names_it(tmp_path):
    write_metrics(tmp_path)
    with pytest.raises(LatheError, match=r"lowrank: report of variant 'lowrank' not found"):
        load_rows(tmp_path, ["teacher", "lowrank"])
    (tmp_path / "teacher" / "detail.json").unlink()
    with pytest.raises(LatheError, match=r"teacher/detail\.json: not found"):
        load_rows(tmp_path, ["teacher"])


def test_incomplete_or_broken_metrics_name_the_file_and_key(tmp_path):
    write_metrics(tmp_path, {"teacher": {k: v for k, v in METRICS["teacher"].items() if k != "macs"}})
    with pytest.raises(LatheError, match=r"teacher/metrics\.json: missing metrics \['macs'\]"):
        load_rows(tmp_path, ["teacher"])
    (tmp_path / "teacher" / "metrics.json").write_text("{not json")
    with pytest.raises(LatheError, match=r"teacher/metrics\.json: not valid JSON"):
        load_rows(tmp_path, ["teacher"])


def test_bad_variant_lists_are_refused(tmp_path):
    write_metrics(tmp_path)
    with pytest.raises(LatheError, match="more than once"):
        load_rows(tmp_path, ["teacher", "teacher"])
    with pytest.raises(LatheError, match="not a relative folder"):
        load_rows(tmp_path, ["../teacher"])


# --- analysis -----------------------------------------------------------------------------------


def test_pareto_front_minimises_x_and_maximises_y():
    rows = rows_of(a=(1, 0.5), b=(2, 0.7), c=(3, 0.6), d=(2, 0.7), e=(0.5, 0.2), f=(4, 0.8))
    # c is dominated by b (smaller and better); b and d tie and both stay; e is smallest; f is best.
    assert pareto_front(rows, "x", "y") == ["a", "b", "d", "e", "f"]


def test_pareto_front_of_one_row_is_that_row():
    assert pareto_front(rows_of(only=(5, 0.1)), "x", "y") == ["only"]


def test_ratios_are_oriented_so_bigger_is_better():
    r = ratios_to(METRICS["teacher"], METRICS["quantized/student"])
    assert r["size_ratio"] == round(4_950_000 / 173_000, 4)
    assert r["speedup_p50"] == round(1.27 / 0.17, 4) and r["throughput_ratio"] == 6.0
    assert r["params_ratio"] == round(1_200_000 / 115_000, 4)
    assert r["accuracy_delta_pt"] == pytest.approx(1.4) and r["escape_rate_delta_pt"] == pytest.approx(-1.0)
    assert ratios_to(METRICS["teacher"], METRICS["teacher"])["size_ratio"] == 1.0


def test_comparison_is_keyed_by_variant_and_marks_pareto_rows(tmp_path):
    rows = load_rows(write_metrics(tmp_path), list(METRICS))
    c = build_comparison(rows, "teacher")
    assert c["reference"] == "teacher" and c["order"] == list(METRICS)
    v = c["variants"]
    # student and quantized/student beat teacher and pruned on size and latency at better accuracy
    assert [n for n in c["order"] if v[n]["pareto_size"]] == ["quantized/student"]
    assert [n for n in c["order"] if v[n]["pareto_latency"]] == ["quantized/student"]
    assert v["pruned"]["size_ratio"] == 3.0 and v["teacher"]["accuracy_delta_pt"] == 0.0
    json.dumps(c, allow_nan=False)  # strict JSON, as write_json needs


def test_unknown_reference_is_refused(tmp_path):
    rows = load_rows(write_metrics(tmp_path), ["teacher", "pruned"])
    with pytest.raises(LatheError, match="reference variant 'student' is not among"):
        build_comparison(rows, "student")


def test_markdown_has_human_units_ratios_and_stars(tmp_path):
    md = compare_markdown(build_comparison(load_rows(write_metrics(tmp_path), list(METRICS)), "teacher"))
    assert "| quantized/student ★ | 115k | 6.00M | 173.0 KB | 72.9% (69.9-75.9) |" in md
    assert "| teacher | 1.20M | 40.0M | 4.95 MB | 71.5% (68.5-74.5) |" in md
    assert "28.6x smaller" in md and "7.5x faster" in md and "+1.4 pt" in md
    assert "| teacher | reference |" in md and "0.170 ms" in md and "1.27 ms" in md


def test_markdown_says_which_stage_measured_latency_and_how(tmp_path):
    one = compare_markdown(build_comparison(load_rows(write_metrics(tmp_path), list(METRICS)), "teacher"))
    assert f"Latency and throughput as measured by the {TIMING}." in one and "`make bench`" in one
    write_metrics(tmp_path, {"pruned": METRICS["pruned"]}, timing="evaluate stage: batch 8")
    two = compare_markdown(build_comparison(load_rows(tmp_path, list(METRICS)), "teacher"))
    assert "- pruned: the evaluate stage: batch 8" in two
    assert f"- teacher, student, quantized/student: the {TIMING}" in two


def test_formatting_helpers():
    assert (fmt_bytes(512), fmt_bytes(173_000), fmt_bytes(4_950_000)) == ("512 B", "173.0 KB", "4.95 MB")
    assert fmt_times(0.5, "faster", "slower") == "2.0x slower" and fmt_times(1.02, "a", "b") == "same"
    assert fmt_times(None, "a", "b") == "n/a"


def test_pareto_png_is_a_byte_stable_png(tmp_path):
    c = build_comparison(load_rows(write_metrics(tmp_path), list(METRICS)), "teacher")
    first, second = pareto_png(c, dpi=60), pareto_png(c, dpi=60)
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and first == second
    assert b"tIME" not in first and b"matplotlib" not in first  # no timestamp chunk, no version tag


def test_each_variant_is_paired_with_the_reference_on_the_same_cells(tmp_path):
    rows = load_rows(write_metrics(tmp_path), list(METRICS))
    c = build_comparison(rows, "teacher")
    assert "paired_vs_reference" not in c["variants"]["teacher"]
    p = c["variants"]["quantized/student"]["paired_vs_reference"]["accuracy"]
    # 0.729 vs 0.715 of 654 cells: 9 more right cells, none lost (predictions_for keeps the right ones first)
    assert p["diff_pt"] == pytest.approx(100 * 9 / 654, abs=1e-3) and p["ci95_pt"][0] > 0 and p["p_value"] < 0.01
    assert p["not_worse"]
    pruned = c["variants"]["pruned"]["paired_vs_reference"]["accuracy"]  # 0.70: 10 cells fewer right
    assert pruned["diff_pt"] < 0 and not pruned["not_worse"]
    md = compare_markdown(c)
    assert "## Paired against teacher (the same test cells)" in md
    assert "| pruned | -1.5 pt" in md and "not shown for accuracy" in md


def test_qat_is_paired_with_post_training_int8_of_the_same_float_model(tmp_path):
    qat = dict(METRICS["quantized/student"], size_bytes=160_000, accuracy=0.745)  # 0.745 vs 0.729: 10 more right
    rows = load_rows(write_metrics(tmp_path, {**METRICS, "qat/student": qat}), [*METRICS, "qat/student"])
    c = build_comparison(rows, "teacher")
    [pair] = c["qat_vs_ptq"]
    assert (pair["qat"], pair["ptq"]) == ("qat/student", "quantized/student")
    acc = pair["paired"]["accuracy"]
    assert acc["diff_pt"] == pytest.approx(100 * 10 / 654, abs=1e-3) and acc["ci95_pt"][0] > 0 and acc["p_value"] < 0.01
    md = compare_markdown(c)
    assert "## Quantization-aware against post-training INT8 (the same test cells)" in md
    assert "| qat/student vs quantized/student | 160.0 KB / 173.0 KB | +1.5 pt" in md


def test_a_qat_variant_without_its_post_training_twin_is_not_paired(tmp_path):
    assert qat_ptq_pairs(["teacher", "qat/student", "quantized/pruned", "qat/pruned"]) == [
        ("qat/pruned", "quantized/pruned")]
    rows = load_rows(write_metrics(tmp_path), list(METRICS))
    c = build_comparison(rows, "teacher")
    assert c["qat_vs_ptq"] == [] and "Quantization-aware" not in compare_markdown(c)
