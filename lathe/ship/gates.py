"""The decision threshold (chosen on val) and a target's gates (judged on test), per candidate variant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lathe.errors import DataError, LatheError
from lathe.markdown import markdown_table
from lathe.measure.intervals import interval_fields, rate_intervals
from lathe.measure.reports import read_report
from lathe.ship.contract import MEASURED_GATES, MODEL_FILE
from lathe.ship.params import TargetParams

THRESHOLD_SPLIT = "val"
REPORT_SPLIT = "test"
THRESHOLD_DECIMALS = 6  # the threshold is rounded down to this, so the rounded value still meets the target
GATES = ("max_size_bytes", "max_latency_p50_ms", "min_accuracy", "min_defective_recall", "max_false_reject_rate")


@dataclass(frozen=True)
class Threshold:
    value: float  # p_defective >= value -> judged defective
    recall_target: float
    val: dict[str, float | int]  # recall, false-reject rate and counts at `value` on the val split
    test: dict[str, float | int]  # the same on the test split


def p_defective(logits: np.ndarray, defective: Sequence[int]) -> np.ndarray:
    """(N, K) logits -> (N,) float64 softmax mass on the defective class indices."""
    from lathe.measure.ort import softmax

    return softmax(logits)[:, list(defective)].sum(axis=1)


def rates_at(p_def: np.ndarray, labels: np.ndarray, defective_classes: Sequence[int],
             threshold: float) -> dict[str, float | int]:
    """Defective recall, escape rate and false-reject rate (good judged defective) at `threshold`."""
    defective = np.isin(np.asarray(labels), defective_classes)
    judged = np.asarray(p_def) >= threshold
    n_def, n_fun = int(defective.sum()), int((~defective).sum())
    tp, fp = int((defective & judged).sum()), int((~defective & judged).sum())
    recall = tp / n_def if n_def else 0.0
    return {"defective_recall": round(recall, 6), "escape_rate": round(1 - recall, 6) if n_def else 0.0,
            "false_reject_rate": round(fp / n_fun, 6) if n_fun else 0.0, "n_defective": n_def, "n_functional": n_fun,
            # 95% bootstrap intervals over these cells (lathe.measure.intervals): deterministic
            **interval_fields(rate_intervals(defective, judged))}


def choose_threshold(p_def: np.ndarray, labels: np.ndarray, defective: Sequence[int], recall_target: float) -> float:
    """The highest threshold t with recall(p_def >= t) >= recall_target on these samples.

    With n defective samples, k = ceil(target * n) of them must be caught: t is the k-th highest
    p_defective among the defective samples, rounded *down* to THRESHOLD_DECIMALS (so the rounded
    threshold still catches them). Ties in p_defective only raise the recall at t. Deterministic.
    """
    p_def = np.asarray(p_def, dtype=np.float64)
    scores = np.sort(p_def[np.isin(np.asarray(labels), defective)])[::-1]
    if len(scores) == 0:
        raise DataError(f"the {THRESHOLD_SPLIT} split holds no defective sample (classes {list(defective)}); "
                        "cannot choose a decision threshold")
    k = max(1, math.ceil(recall_target * len(scores) - 1e-9))
    scale = 10 ** THRESHOLD_DECIMALS
    return math.floor(float(scores[k - 1]) * scale) / scale


@dataclass(frozen=True)
class Candidate:
    variant: str
    metrics: dict  # reports/<variant>/ as lathe.measure.reports.read_report joins it (headline + detail + timing_method)
    threshold: Threshold
    gates: list[dict]  # [{"gate", "limit", "value", "passed"}] in GATES order

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)


def passes_unmeasured_gates(c: Candidate) -> bool:
    """Whether `c` passes every gate whose figure does not depend on the machine (all but latency): what
    `select` asks of a candidate."""
    return all(g["passed"] for g in c.gates if g["gate"] not in MEASURED_GATES)


def measured_failures(c: Candidate) -> list[str]:
    """`c`'s failed gates measured on this machine, in words ("max_latency_p50_ms: 0.787 ms > 0.500 ms")."""
    return [f"{g['gate']}: {_fmt(g['gate'], g['value'])} > {_fmt(g['gate'], g['limit'])}"
            for g in c.gates if g["gate"] in MEASURED_GATES and not g["passed"]]


def check_gates(gates_cfg, metrics: dict, threshold: Threshold) -> list[dict]:
    """Every gate of the profile against one variant; a null limit is reported as passed (not gated)."""
    values = {
        "max_size_bytes": metrics["size_bytes"],
        "max_latency_p50_ms": metrics["latency_p50_ms"],
        "min_accuracy": metrics["accuracy"],
        "min_defective_recall": threshold.test["defective_recall"],
        "max_false_reject_rate": threshold.test["false_reject_rate"],
    }
    out = []
    for gate in GATES:
        limit, value = getattr(gates_cfg, gate), values[gate]
        if limit is None:
            passed = True
        elif gate.startswith("max_"):
            passed = value <= limit
        else:
            passed = value >= limit
        out.append({"gate": gate, "limit": limit, "value": value, "passed": bool(passed)})
    return out


# Each selection policy (lathe.ship.params.SelectionPolicy) ranks the candidates passing every gate by these
# keys, best first: (manifest.selection row field, "asc" | "desc"). Ties fall to the next key and
# finally to the variant name, so a choice is deterministic. Only `fastest` reads a measurement
# (latency on the build machine); the other two rank by machine-independent figures alone.
RANKS: dict[str, tuple[tuple[str, str], ...]] = {
    "smallest": (("size_bytes", "asc"), ("accuracy", "desc"), ("variant", "asc")),
    "fastest": (("latency_p50_ms", "asc"), ("size_bytes", "asc"), ("accuracy", "desc"), ("variant", "asc")),
    "most_accurate": (("accuracy", "desc"), ("size_bytes", "asc"), ("variant", "asc")),
}
MEASURED_RANK_FIELDS = ("latency_p50_ms",)


def rank_rule(policy: str) -> str:
    """The policy's ranking in words ("size_bytes ascending, then accuracy descending, then variant name")."""
    words = [f"{f} {'ascending' if o == 'asc' else 'descending'}" for f, o in RANKS[policy] if f != "variant"]
    return ", then ".join(words + ["variant name"])


def rank_key(policy: str, row: dict) -> tuple:
    """Sort key of a selection row under `policy` (smaller is better). KeyError/TypeError on a missing field."""
    key: list = []
    for field, order in RANKS[policy]:
        value = row[field]
        if field == "variant":
            key.append(str(value))
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{field} is {value!r}, not a number")
        else:
            key.append(value if order == "asc" else -value)
    return tuple(key)


def selection_row(c: Candidate) -> dict:
    """A candidate as manifest.selection lists it (latency_p50_ms is a measurement: not identity)."""
    return {"variant": c.variant, "passed": c.passed, "size_bytes": c.metrics["size_bytes"],
            "latency_p50_ms": c.metrics["latency_p50_ms"], "accuracy": c.metrics["accuracy"],
            "failed": [g["gate"] for g in c.gates if not g["passed"]]}


def select(candidates: list[Candidate], policy: str = "smallest") -> Candidate | None:
    """The best candidate under `policy` (RANKS) among those passing every gate not measured on the machine;
    None when none passes them.

    The latency gate is judged and reported (the gate table, manifest.selection, the card's measured section) but
    does not decide: the choice is part of the package's identity, which must be the same wherever it is
    rebuilt, and a p50 on the build machine is not the target device's (the same INT8 student: 0.42 ms on one
    AMD EPYC, 0.79 ms on another; README "Determinism")."""
    ok = [c for c in candidates if passes_unmeasured_gates(c)]
    if not ok:
        return None
    return min(ok, key=lambda c: rank_key(policy, selection_row(c)))


def choice_problems(policy: str, chosen: str, rows: list[dict], metrics_test: dict | None = None) -> list[str]:
    """What is wrong with choosing `chosen` under `policy` given the candidate rows (manifest.selection).

    Empty when: the rows name each variant once, `passed` agrees with `failed`, the chosen variant
    is listed, passed every gate not measured on the machine, agrees with `metrics_test`
    (manifest.metrics.test) on size and accuracy, and is the policy's best among the rows that passed those
    (or, as packages built before latency stopped deciding chose, among the rows that passed every gate).
    """
    problems: list[str] = []
    names = [r.get("variant") for r in rows]
    twice = sorted({str(n) for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"candidates listed twice: {', '.join(twice)}")
    for r in rows:
        if bool(r.get("passed")) == bool(r.get("failed")):
            problems.append(f"candidate {r.get('variant')}: passed={r.get('passed')} but failed gates "
                            f"{r.get('failed') or []}")
    row = next((r for r in rows if r.get("variant") == chosen), None)
    if row is None:
        return problems + [f"the chosen variant {chosen} is not among the {len(rows)} candidates listed"]
    if unmeasured_failures(row):
        problems.append(f"the chosen variant {chosen} did not pass every gate not measured on the machine "
                        f"(failed {row.get('failed')})")
    for key in ("size_bytes", "accuracy"):
        if metrics_test is not None and key in metrics_test and metrics_test[key] != row.get(key):
            problems.append(f"selection lists {chosen} with {key} {row.get(key)} but metrics.test says "
                            f"{str(metrics_test[key])[:40]}")
    passing = [r for r in rows if not unmeasured_failures(r)]
    fields = [f for f, _ in RANKS[policy]]
    lacking = sorted({str(r.get("variant")) for r in passing for f in fields if r.get(f) is None})
    if lacking:
        return problems + [(f"policy {policy} ranks by {', '.join(fields)}, which candidate(s) {', '.join(lacking)} "
                            "do not list")]
    best = min(passing, key=lambda r: rank_key(policy, r))
    # Packages built before 2026-12-08 chose among the rows passing every gate, latency too: still a right choice
    earlier = [r for r in rows if r.get("passed")]
    if best["variant"] != chosen and not (row.get("passed") and min(earlier, key=lambda r: rank_key(policy, r))
                                          ["variant"] == chosen):
        shown = ", ".join(f"{f} {best[f]} vs {row[f]}" for f, _ in RANKS[policy] if f != "variant")
        problems.append(f"policy {policy} ({rank_rule(policy)}) picks {best['variant']} among the {len(passing)} "
                        f"passing candidates, not {chosen} ({shown})")
    return problems


def unmeasured_failures(row: dict) -> list[str]:
    """The gates a manifest.selection row failed, but for those measured on the build machine."""
    failed = row.get("failed")
    return [g for g in failed if g not in MEASURED_GATES] if isinstance(failed, list) else ["(no failed list)"]


def _fmt(gate: str, value: float | int | None, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "-"
    if gate == "max_size_bytes":
        return f"{int(value):,} B"
    if gate == "max_latency_p50_ms":
        return f"{value:.3f} ms"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


# Where a gated figure's 95% interval lives: (where, its key prefix) - the variant's report for the
# argmax accuracy, the threshold's test rates for the decisions at the threshold.
GATE_INTERVALS = {"min_accuracy": ("metrics", "accuracy"), "min_defective_recall": ("test", "defective_recall"),
                  "max_false_reject_rate": ("test", "false_reject_rate")}


def gate_interval(c: Candidate, gate: str) -> tuple[float, float] | None:
    """The 95% interval of a candidate's gated figure, when its reports carry one."""
    if gate not in GATE_INTERVALS:
        return None
    where, key = GATE_INTERVALS[gate]
    source = c.metrics if where == "metrics" else c.threshold.test
    lo, hi = source.get(f"{key}_ci95_low"), source.get(f"{key}_ci95_high")
    return (lo, hi) if lo is not None and hi is not None else None


def gate_table(target: str, candidates: list[Candidate], measured_apart: bool = False) -> str:
    """Markdown: one row per variant, one column per gate ('value PASS|FAIL'), the limits in the header.

    `measured_apart`: measured gates (latency) show only pass/FAIL, their value being reported apart
    (a model card's identity part must not hold a figure of the build machine).
    """
    if not candidates:
        return "(no candidates)"
    limits = {g["gate"]: g["limit"] for g in candidates[0].gates}
    head = ["variant"] + [f"{g} ({_fmt(g, limits[g]) if limits[g] is not None else 'not gated'})" for g in GATES] + ["all"]
    rows = []
    for c in candidates:
        cells = [c.variant] + [f"{'measured' if measured_apart and g['gate'] in MEASURED_GATES else _fmt(g['gate'], g['value'], gate_interval(c, g['gate']))} "
                               f"{'pass' if g['passed'] else 'FAIL'}" for g in c.gates]
        cells.append("pass" if c.passed else "FAIL")
        rows.append(cells)
    return markdown_table(head, rows).removesuffix("\n")  # its callers (the card, a no-pass error) add their own


def evaluate_candidate(variant: str, models_dir: Path, reports_dir: Path, splits: dict[str, dict],
                       target: TargetParams, defective: Sequence[int]) -> tuple[Candidate, dict[str, np.ndarray]]:
    """Run the variant through onnxruntime on val (threshold) and test (rates there); check the gates.

    Returns the candidate and its logits per split.
    """
    from lathe.measure.ort import load_session, model_files, predict

    model_path = models_dir / variant / MODEL_FILE
    files = model_files(model_path)
    if len(files) != 1:
        raise LatheError(f"{model_path}: keeps weights in external data files {[str(f) for f in files[1:]]}; "
                         "a package ships a single self-contained model.onnx")
    metrics = read_report(reports_dir / variant)  # metrics.json + detail.json; errors name the file
    session = load_session(model_path, threads=1)
    logits = {s: predict(session, splits[s]["images"]) for s in (THRESHOLD_SPLIT, REPORT_SPLIT)}
    val, test = splits[THRESHOLD_SPLIT], splits[REPORT_SPLIT]
    p_val = p_defective(logits[THRESHOLD_SPLIT], defective)
    p_test = p_defective(logits[REPORT_SPLIT], defective)
    t = choose_threshold(p_val, val["labels"], defective, target.defective_recall_target)
    threshold = Threshold(value=t, recall_target=target.defective_recall_target,
                          val=rates_at(p_val, val["labels"], defective, t),
                          test=rates_at(p_test, test["labels"], defective, t))
    return Candidate(variant, metrics, threshold, check_gates(target.gates, metrics, threshold)), logits


def load_gate_splits(prepared_dir: Path) -> dict[str, dict]:
    """The val (threshold) and test (gates) splits of the prepared data, labels as int64."""
    from lathe.data.ingest import load_split

    splits = {s: load_split(prepared_dir, s) for s in (THRESHOLD_SPLIT, REPORT_SPLIT)}
    for split in splits.values():
        split["labels"] = split["labels"].astype(np.int64)
    return splits


def evaluate_candidates(variants: Sequence[str], models_dir: Path, reports_dir: Path, splits: dict[str, dict],
                        target: TargetParams, defective: Sequence[int]) -> tuple[list[Candidate], dict[str, dict]]:
    """evaluate_candidate for each variant, in order: (the candidates, each variant's logits per split)."""
    candidates, logits_of = [], {}
    for variant in variants:
        c, logits = evaluate_candidate(variant, models_dir, reports_dir, splits, target, defective)
        candidates.append(c)
        logits_of[variant] = logits
    return candidates, logits_of
