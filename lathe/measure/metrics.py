"""Classification metrics in plain numpy (shared by training, evaluation and packaging)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Metrics measured on the machine that runs the evaluation (by nature different elsewhere): they are
# reported, gated and shown, but never part of a model's or package's identity (lathe.ship.contract).
TIMING_KEYS = ("latency_p50_ms", "latency_p95_ms", "throughput_ips")
# The headline figures of an evaluated variant: what reports/<variant>/metrics.json holds, and so what
# `dvc metrics show/diff` and `dvc exp show` list (one column each). Everything else the evaluate stage
# measures goes to reports/<variant>/detail.json, which is not a DVC metrics file (lathe.measure.reports).
HEADLINE_KEYS = ("accuracy", "balanced_accuracy", "defective_recall", "false_reject_rate",
                 "size_bytes", "params", "macs", *TIMING_KEYS)


def latency_method(stage: str, threads: int, runs: int, warmup: int, order: str, batch: int = 1) -> str:
    """How a latency figure was measured, in one line (shown wherever two sources of latency meet).

    e.g. "evaluate stage: onnxruntime CPU, batch 1, 1 thread, p50/p95 of 300 calls after 20 warm-up calls,
    each model timed alone"
    """
    return (f"{stage}: onnxruntime CPU, batch {batch}, {threads} thread{'s' if threads != 1 else ''}, "
            f"p50/p95 of {runs} calls after {warmup} warm-up calls, {order}")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per true class; NaN-free: a class with no samples gets 0."""
    support = cm.sum(axis=1)
    return np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)


def accuracy(cm: np.ndarray) -> float:
    """Fraction of correct predictions."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples."""
    support = cm.sum(axis=1)
    present = support > 0
    return float(per_class_recall(cm)[present].mean()) if present.any() else 0.0


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over classes that appear in truth or predictions."""
    tp = np.diag(cm).astype(float)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def binary_defect_metrics(y_true: np.ndarray, y_pred: np.ndarray, defective: Sequence[int]) -> dict[str, float]:
    """Defective (a class index in `defective`) vs good: recall, precision, escape and false-reject rates."""
    t = np.isin(np.asarray(y_true), defective)
    p = np.isin(np.asarray(y_pred), defective)
    tp, fn = int((t & p).sum()), int((t & ~p).sum())
    fp, tn = int((~t & p).sum()), int((~t & ~p).sum())
    return {
        "defective_recall": tp / (tp + fn) if tp + fn else 0.0,
        "defective_precision": tp / (tp + fp) if tp + fp else 0.0,
        # escape: a defective cell judged functional, the error a plant fears most
        "escape_rate": fn / (tp + fn) if tp + fn else 0.0,
        "false_reject_rate": fp / (fp + tn) if fp + tn else 0.0,
        "binary_accuracy": (tp + tn) / len(t) if len(t) else 0.0,
    }
