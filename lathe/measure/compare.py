"""Compare evaluated model variants side by side: a table, ratios to a reference, a Pareto front.

Input is what the evaluate stage wrote, `reports/<variant>/{metrics,detail}.json` and `predictions.csv`
(lathe.measure.reports), one per variant; nothing is re-measured here. Quality figures carry their 95%
bootstrap intervals, and each variant is compared with the reference *paired*, on the same test cells
(lathe.measure.intervals): the interval of the difference and its p-value. Latency and throughput are therefore those of the evaluate
stage, and the report says how it measured them (its `timing_method`).

compare.json is a plain output, not a DVC metrics file: its ~200 numbers (ratios, flags) would be
columns of `dvc metrics show`; the per-variant headline figures are there already.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from lathe.errors import LatheError
from lathe.markdown import markdown_table
from lathe.measure.intervals import INTERVAL_METRICS, Cells, not_worse, paired
from lathe.measure.metrics import HEADLINE_KEYS
from lathe.measure.plots import figure, png_bytes, style
from lathe.measure.reports import DETAIL_FILE, METRICS_FILE, TIMING_METHOD, read_cells, read_report

# What each row carries from the variant's report (all numbers; fractions for quality, bytes, ms, images/s).
METRIC_KEYS = (
    "params", "macs", "size_bytes", "accuracy", "balanced_accuracy", "defective_recall", "escape_rate",
    "latency_p50_ms", "latency_p95_ms", "throughput_ips",
)
QUALITY_KEYS = ("accuracy", "balanced_accuracy", "defective_recall", "escape_rate")
# The two Pareto views: (name, cost key to minimise). Quality (the y key) is maximised.
PARETO_VIEWS = (("size", "size_bytes"), ("latency", "latency_p50_ms"))

Row = dict[str, Any]  # {"name": str, <METRIC_KEYS>: number, "timing_method": str, "ci95": {...}, "cells": Cells}
# "Not worse than the reference": the paired difference's unfavourable end within this many points
NOT_WORSE_MARGIN_PT = 1.0
LOWER_IS_BETTER = ("false_reject_rate",)
# Variant names of the two INT8 routes from one float model: post-training (quantize stage) and
# quantization-aware (qat stage), e.g. quantized/student and qat/student.
PTQ_PREFIX, QAT_PREFIX = "quantized/", "qat/"


# ---------------------------------------------------------------------------------------------
# Loading


def _check_variant_name(name: str) -> None:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise LatheError(f"variant name {name!r} is not a relative folder name under the reports folder")


def load_rows(reports_dir: Path, variants: Sequence[str]) -> list[Row]:
    """One row per variant, in the order given, from `reports_dir/<variant>/` (lathe.measure.reports.read_report).

    Errors name the file: missing, not JSON, or lacking one of METRIC_KEYS.
    """
    if not variants:
        raise LatheError("no variants to compare; list at least one (the first is the reference by default)")
    duplicates = sorted({v for v in variants if list(variants).count(v) > 1})
    if duplicates:
        raise LatheError(f"variants listed more than once: {duplicates}")
    rows = []
    for variant in variants:
        _check_variant_name(variant)
        report_dir = Path(reports_dir) / variant
        if not report_dir.is_dir():
            raise LatheError(f"{report_dir}: report of variant {variant!r} not found; the evaluate stage writes it "
                             f"(evaluate models/{variant} first, or drop {variant!r} from the list)")
        metrics = read_report(report_dir)
        missing = [k for k in METRIC_KEYS if k not in metrics]
        if missing:
            where = METRICS_FILE if missing[0] in HEADLINE_KEYS else DETAIL_FILE
            raise LatheError(f"{report_dir / where}: missing metrics {missing}; re-run the evaluate stage for "
                             f"{variant!r}")
        bad = [k for k in METRIC_KEYS if isinstance(metrics[k], bool) or not isinstance(metrics[k], (int, float))
               or not math.isfinite(metrics[k])]
        if bad:
            raise LatheError(f"{report_dir}: metrics {bad} are not finite numbers")
        ci95 = {m: [metrics[f"{m}_ci95_low"], metrics[f"{m}_ci95_high"]] for m in INTERVAL_METRICS
                if f"{m}_ci95_low" in metrics and f"{m}_ci95_high" in metrics}
        rows.append({"name": variant, **{k: metrics[k] for k in METRIC_KEYS}, TIMING_METHOD: metrics[TIMING_METHOD],
                     "ci95": ci95, "cells": read_cells(report_dir)})
    return rows


def paired_entry(variant: Cells, reference: Cells) -> dict[str, dict[str, Any]]:
    """compare.json's paired view of one variant: per INTERVAL_METRICS figure, (variant - reference) in
    points with its 95% interval, the p-value, and whether it is not worse by more than the margin."""
    out = {}
    for m, d in paired(variant, reference).items():
        out[m] = {**d.points(), "not_worse": not_worse(d, NOT_WORSE_MARGIN_PT / 100, m not in LOWER_IS_BETTER)}
    return out


def qat_ptq_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(qat/x, quantized/x) for each QAT variant among `names` whose post-training twin is there too, sorted."""
    present = set(names)
    return [(n, PTQ_PREFIX + n.removeprefix(QAT_PREFIX)) for n in sorted(present)
            if n.startswith(QAT_PREFIX) and PTQ_PREFIX + n.removeprefix(QAT_PREFIX) in present]


# ---------------------------------------------------------------------------------------------
# Pure analysis


def pareto_front(rows: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list[str]:
    """Names of the rows no other row dominates, lower `x_key` and higher `y_key` being better.

    Row b dominates row a when b is no worse on both and strictly better on one; rows with equal
    (x, y) do not dominate each other, so ties are all kept. Input order is preserved.
    """
    front = []
    for a in rows:
        dominated = any(
            b[x_key] <= a[x_key] and b[y_key] >= a[y_key] and (b[x_key] < a[x_key] or b[y_key] > a[y_key])
            for b in rows
        )
        if not dominated:
            front.append(a["name"])
    return front


def _ratio(num: float, den: float) -> float | None:
    # None (JSON null, which dvc skips) rather than inf/NaN, which strict JSON cannot hold.
    return round(num / den, 4) if den else None


def ratios_to(reference: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, float | None]:
    """`row` against `reference`, each ratio oriented so that > 1 means `row` is better.

    size/params/macs_ratio: reference / row ("x smaller"); speedup_p50/p95: reference latency /
    row latency ("x faster"); throughput_ratio: row / reference; *_delta_pt: (row - reference) in
    percentage points (for escape_rate, negative is better).
    """
    out: dict[str, float | None] = {
        "size_ratio": _ratio(reference["size_bytes"], row["size_bytes"]),
        "params_ratio": _ratio(reference["params"], row["params"]),
        "macs_ratio": _ratio(reference["macs"], row["macs"]),
        "speedup_p50": _ratio(reference["latency_p50_ms"], row["latency_p50_ms"]),
        "speedup_p95": _ratio(reference["latency_p95_ms"], row["latency_p95_ms"]),
        "throughput_ratio": _ratio(row["throughput_ips"], reference["throughput_ips"]),
    }
    for key in QUALITY_KEYS:
        out[f"{key}_delta_pt"] = round(100.0 * (row[key] - reference[key]), 4)
    return out


def build_comparison(rows: Sequence[Row], reference: str, pareto_metric: str = "accuracy") -> dict[str, Any]:
    """The content of compare.json: per variant its metrics, ratios to `reference` and Pareto flags.

    {"reference": str, "pareto_metric": str, "order": [names as listed],
     "timing_methods": {method: [variants timed that way]},
     "variants": {name: {<METRIC_KEYS>, <ratios_to keys>, "pareto_size": bool, "pareto_latency": bool}}}
    """
    names = [r["name"] for r in rows]
    if reference not in names:
        raise LatheError(f"reference variant {reference!r} is not among the compared variants {names}")
    if pareto_metric not in METRIC_KEYS:
        raise LatheError(f"pareto_metric {pareto_metric!r} is not one of the row metrics {list(METRIC_KEYS)}")
    ref = rows[names.index(reference)]
    fronts = {view: set(pareto_front(rows, cost, pareto_metric)) for view, cost in PARETO_VIEWS}
    variants = {}
    for r in rows:
        entry: dict[str, Any] = {k: r[k] for k in METRIC_KEYS}
        entry["ci95"] = r.get("ci95", {})
        entry.update(ratios_to(ref, r))
        if r["name"] != reference and r.get("cells") is not None and ref.get("cells") is not None:
            entry["paired_vs_reference"] = paired_entry(r["cells"], ref["cells"])
        for view, _ in PARETO_VIEWS:
            entry[f"pareto_{view}"] = r["name"] in fronts[view]
        variants[r["name"]] = entry
    methods: dict[str, list[str]] = {}
    for r in rows:
        methods.setdefault(r.get(TIMING_METHOD) or "not recorded", []).append(r["name"])
    by_name = {r["name"]: r for r in rows}
    qat_vs_ptq = [{"qat": q, "ptq": p, "paired": paired_entry(by_name[q]["cells"], by_name[p]["cells"])}
                  for q, p in qat_ptq_pairs(names)
                  if by_name[q].get("cells") is not None and by_name[p].get("cells") is not None]
    return {"reference": reference, "pareto_metric": pareto_metric, "order": names, "timing_methods": methods,
            "not_worse_margin_pt": NOT_WORSE_MARGIN_PT, "variants": variants, "qat_vs_ptq": qat_vs_ptq}


# ---------------------------------------------------------------------------------------------
# Formatting (decimal units: 1 KB = 1000 B, 1 MB = 10^6 B)


def fmt_bytes(n: float) -> str:
    if n < 1e3:
        return f"{n:.0f} B"
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    return f"{n / 1e6:.2f} MB"


def fmt_count(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            v = n / scale
            return f"{v:.2f}{suffix}" if v < 10 else f"{v:.1f}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{n:.0f}"


def fmt_ms(ms: float) -> str:
    if ms < 0.01:
        return f"{1000 * ms:.2f} µs"
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def fmt_times(ratio: float | None, better: str, worse: str) -> str:
    """2.0 -> "2.0x smaller"; 0.5 -> "2.0x larger"; equal -> "same"."""
    if ratio is None:
        return "n/a"
    if round(ratio, 1) == 1.0 and round(1 / ratio, 1) == 1.0:
        return "same"
    return f"{ratio:.1f}x {better}" if ratio >= 1 else f"{1 / ratio:.1f}x {worse}"


def fmt_delta(pt: float) -> str:
    return f"{pt:+.1f} pt"


def fmt_ci(entry: Mapping[str, Any], key: str) -> str:
    """74.3% (70.9-77.6): the figure and its 95% interval, when the report has one."""
    ci = (entry.get("ci95") or {}).get(key)
    return fmt_pct(entry[key]) + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def fmt_paired(d: Mapping[str, Any]) -> str:
    """+1.2 pt (-0.8, +3.1) p=0.23: a paired difference, its 95% interval and p-value."""
    lo, hi = d["ci95_pt"]
    return f"{d['diff_pt']:+.1f} pt ({lo:+.1f}, {hi:+.1f}) p={d['p_value']:.2g}"


def compare_markdown(comparison: Mapping[str, Any]) -> str:
    """A readable report: absolute numbers, then ratios to the reference; Pareto rows marked."""
    ref, metric = comparison["reference"], comparison["pareto_metric"]
    variants = comparison["variants"]
    label = {"accuracy": "4-class accuracy", "balanced_accuracy": "balanced accuracy",
             "defective_recall": "defective recall"}.get(metric, metric)

    def marks(e: Mapping[str, Any]) -> str:
        return " + ".join(view for view, _ in PARETO_VIEWS if e[f"pareto_{view}"]) or "-"

    methods = comparison.get("timing_methods") or {}
    if len(methods) == 1:
        timing = [f"Latency and throughput as measured by the {next(iter(methods))}."]
    else:
        timing = ["Latency and throughput as measured by:", ""] + [f"- {', '.join(names)}: the {method}"
                                                                   for method, names in methods.items()]
    overview = []
    for name in comparison["order"]:
        e = variants[name]
        star = " ★" if any(e[f"pareto_{view}"] for view, _ in PARETO_VIEWS) else ""
        overview.append([f"{name}{star}", fmt_count(e["params"]), fmt_count(e["macs"]), fmt_bytes(e["size_bytes"]),
                         fmt_ci(e, "accuracy"), fmt_ci(e, "balanced_accuracy"), fmt_ci(e, "defective_recall"),
                         fmt_pct(e["escape_rate"]), fmt_ms(e["latency_p50_ms"]), fmt_ms(e["latency_p95_ms"]),
                         f"{e['throughput_ips']:,.0f} img/s", marks(e)])
    against = []
    for name in comparison["order"]:
        e = variants[name]
        if name == ref:
            against.append([name, *["reference"] * 5, *["-"] * 3])
            continue
        against.append([name, fmt_times(e["size_ratio"], "smaller", "larger"),
                        fmt_times(e["params_ratio"], "fewer", "more"), fmt_times(e["macs_ratio"], "fewer", "more"),
                        fmt_times(e["speedup_p50"], "faster", "slower"),
                        fmt_times(e["throughput_ratio"], "higher", "lower"), fmt_delta(e["accuracy_delta_pt"]),
                        fmt_delta(e["defective_recall_delta_pt"]), fmt_delta(e["escape_rate_delta_pt"])])
    pair_rows = []
    for name in comparison["order"]:
        pairs = variants[name].get("paired_vs_reference")
        if pairs:
            verdict = ", ".join(m.replace("_", " ") for m in INTERVAL_METRICS if not pairs[m]["not_worse"])
            pair_rows.append([name, *[fmt_paired(pairs[m]) for m in INTERVAL_METRICS],
                              "yes" if not verdict else f"not shown for {verdict}"])
    margin = comparison.get("not_worse_margin_pt", NOT_WORSE_MARGIN_PT)
    paired_section = [
        f"## Paired against {ref} (the same test cells)",
        "",
        "variant - reference, with the 95% bootstrap interval of the difference and its p-value (McNemar's exact "
        "test; paired bootstrap for balanced accuracy). Not worse = the unfavourable end of the interval is within "
        f"{margin:g} pt (for the false-reject rate: at most {margin:g} pt higher).",
        "",
        markdown_table(["variant", "accuracy", "balanced acc.", "defective recall", "false-reject rate",
                        f"not worse (<= {margin:g} pt)"], pair_rows),
    ] if pair_rows else []
    lines = [
        "# Variant comparison",
        "",
        f"Reference: **{ref}**. Quality on the test split, with 95% bootstrap intervals over its cells in "
        "brackets. 1 KB = 1000 B.",
        "",
        *timing,
        "",
        "`make bench` times the INT8 variants again, interleaved in one process (reports/bench.md): "
        "expect other figures there on the same machine.",
        "",
        f"★ = Pareto-optimal on size or on p50 latency against {label}: no other variant is at least as small "
        "(or fast) and at least as good, and strictly better in one of the two.",
        "",
        markdown_table(["variant", "params", "MACs", "size", "accuracy", "balanced acc.", "defective recall",
                        "escape rate", "p50", "p95", "throughput", "Pareto"],
                       overview, align=["", *["right"] * 10, ""]),
        f"## Against {ref}",
        "",
        markdown_table(["variant", "size", "params", "MACs", "p50 latency", "throughput", "accuracy",
                        "defective recall", "escape rate"],
                       against, align=[""] * 6 + ["right"] * 3),
        *paired_section,
        *qat_vs_ptq_section(comparison.get("qat_vs_ptq") or [], variants),
    ]
    return "\n".join(lines)


def qat_vs_ptq_section(pairs: Sequence[Mapping[str, Any]], variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each quantization-aware variant against the post-training INT8 variant of the same float model, paired."""
    if not pairs:
        return []
    table = [[f"{p['qat']} vs {p['ptq']}",
              f"{fmt_bytes(variants[p['qat']]['size_bytes'])} / {fmt_bytes(variants[p['ptq']]['size_bytes'])}",
              *[fmt_paired(p["paired"][m]) for m in INTERVAL_METRICS]] for p in pairs]
    return ["## Quantization-aware against post-training INT8 (the same test cells)", "",
            "QAT minus PTQ of the same float model, with the 95% bootstrap interval of the difference and its "
            "p-value (McNemar's exact test; paired bootstrap for balanced accuracy). The qat stage also fine-tunes, "
            "distilled from the teacher: the difference is quantization-awareness and that fine-tune together "
            "(docs/experiments.md separates them).", "",
            markdown_table(["pair", "size (QAT / PTQ)", "accuracy", "balanced acc.", "defective recall",
                            "false-reject rate"], table, align=["", "right", "right", "right", "right", "right"])]


# ---------------------------------------------------------------------------------------------
# Plot


def pareto_png(comparison: Mapping[str, Any], dpi: int = 120) -> bytes:
    """Two panels, quality against size (log x) and against p50 latency; PNG bytes, byte-stable.

    `comparison` is build_comparison's. Pareto-optimal points are filled and joined by
    the front's staircase; the others are hollow. Every point is labelled with its variant name.
    """
    metric = comparison["pareto_metric"]
    order, variants = comparison["order"], comparison["variants"]
    with style():
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        fig = figure(11, 4.5, dpi)
        panels = (("size_bytes", "model size (log scale; 1 KB = 1000 B)", True, "pareto_size"),
                  ("latency_p50_ms", "p50 latency, batch 1, evaluate stage (ms)", False, "pareto_latency"))
        for i, (x_key, x_label, log_x, flag) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            front = sorted((variants[n][x_key], 100 * variants[n][metric]) for n in order if variants[n][flag])
            if len(front) > 1:
                xs, ys = zip(*front, strict=True)
                ax.step(xs, ys, where="post", color="tab:blue", linewidth=1, alpha=0.6, label="Pareto front")
            for name in order:
                e = variants[name]
                x, y = e[x_key], 100 * e[metric]
                on_front = e[flag]
                ax.plot([x], [y], marker="o", markersize=7, linestyle="none",
                        markerfacecolor="tab:blue" if on_front else "white",
                        markeredgecolor="tab:blue" if on_front else "tab:gray")
                ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
            if log_x:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v)))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
            ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
            ax.margins(x=0.15, y=0.12)
            if len(front) > 1:
                ax.legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{metric.replace('_', ' ')} against cost (filled: Pareto-optimal; reference "
                     f"{comparison['reference']})", fontsize=10)
        return png_bytes(fig, dpi)
