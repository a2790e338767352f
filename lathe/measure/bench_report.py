"""bench.md: the side-by-side table, the physical floor and the acceptance verdict of a `make bench` report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lathe.markdown import markdown_table
from lathe.measure.bench_timing import MATMUL_OP, bench_timing_method
from lathe.measure.compare import fmt_bytes, fmt_ci, fmt_count, fmt_ms, fmt_paired


def _floor_note(f: Mapping[str, Any]) -> str:
    return (f"{MATMUL_OP}, shapes {', '.join('x'.join(map(str, s)) for s in f['matmul_shapes'])} (MxKxN), "
            f"median of {f['matmul_repeats']} calls each, fastest shape, {f['threads']} thread(s)")


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
    ]
    table = []
    for r in rows:
        f = floor["models"][r["name"]]
        if teacher is None or r is teacher:
            size_vs, speed = "-", "-"
        else:
            size_vs = f"{teacher['size_bytes'] / r['size_bytes']:.1f}x smaller" if r["size_bytes"] else "n/a"
            speed = f"{teacher['latency_p50_ms'] / r['latency_p50_ms']:.2f}x" if r["latency_p50_ms"] else "n/a"
        table.append([r["name"], r["role"], fmt_bytes(r["size_bytes"]), size_vs, fmt_ci(r, "accuracy"),
                      fmt_ci(r, "defective_recall"), fmt_ms(r["latency_p50_ms"]), fmt_ms(r["latency_p95_ms"]), speed,
                      fmt_count(r["params"]), fmt_count(r["macs"]), fmt_bytes(f["int8_param_bytes"]),
                      fmt_ms(f["latency_ms"])])
    lines += [
        markdown_table(["model", "role", "size", "vs teacher", "accuracy", "defective recall", "p50", "p95",
                        "speedup (p50)", "params", "MACs", "floor size", "floor p50"],
                       table, align=["", "", *["right"] * 11]),
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
            "Quality drops are judged at the upper end of their 95% interval, paired on the same test cells "
            "(lathe.measure.intervals). Best pipeline INT8 variant (most criteria passed, then accuracy, then p50): "
            + ", ".join(f"{n} {k}/5" for n, k in acc["candidates"].items()) + ".",
            "",
        ]
        units = {"size_ratio": "x", "latency_ratio": "x", "accuracy_drop_pt": " pt", "defective_recall_drop_pt": " pt"}
        criteria = [[c["name"], c["detail"] if c["value"] is None else f"{c['value']:.2f}{units.get(c['name'], '')}"
                     + (f" ({c['detail']})" if c["value"] is not None and c["detail"] else ""),
                     c["target"], "PASS" if c["passed"] else "FAIL"] for c in acc["criteria"]]
        lines += [markdown_table(["criterion", "measured", "target", "result"], criteria,
                                 align=["", "right", "", ""]),
                  f"Overall: **{'PASS' if acc['passed'] else 'FAIL'}**", ""]
    lines += qat_vs_ptq_section(report.get("qat_vs_ptq") or [], {r["name"]: r for r in rows})
    lines += ["## How each model was made", ""]
    lines += [f"- **{name}**: {origin}" for name, origin in setup["origins"].items()]
    if setup["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in setup["notes"]]
    lines.append("")
    return "\n".join(lines)


def qat_vs_ptq_section(pairs: list[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Quantization-aware against post-training INT8 of the same float model, paired on the same test cells."""
    if not pairs:
        return []
    table = [[f"{p['qat']} vs {p['ptq']}", f"{fmt_bytes(rows[p['qat']]['size_bytes'])} / {fmt_bytes(rows[p['ptq']]['size_bytes'])}",
              f"{fmt_ms(rows[p['qat']]['latency_p50_ms'])} / {fmt_ms(rows[p['ptq']]['latency_p50_ms'])}",
              fmt_paired(p["paired"]["accuracy"]), fmt_paired(p["paired"]["defective_recall"])] for p in pairs]
    return ["## Quantization-aware (QAT) against post-training (PTQ) INT8", "",
            "QAT minus PTQ in percentage points, with the 95% interval of the difference and its p-value "
            "(paired on the same test cells: bootstrap interval, McNemar p). The QAT model is also fine-tuned "
            "for the qat stage's epochs, distilled from the teacher: its gain is QAT's and that fine-tune's together.",
            "", markdown_table(["pair", "size (QAT / PTQ)", "p50 (QAT / PTQ)", "accuracy", "defective recall"], table,
                               align=["", "right", "right", "right", "right"])]
