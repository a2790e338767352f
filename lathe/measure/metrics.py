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


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative, ties
    counting half (Mann-Whitney); 0.5 when either side is empty. Counted exactly: for each positive, the
    negatives below it and those level with it, by binary search in the sorted negatives (no scipy: its
    import cost ~1 s of every evaluate stage)."""
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return 0.5
    negatives = np.sort(s[~pos])
    below = np.searchsorted(negatives, s[pos], side="left")  # (n_pos,) negatives scoring strictly lower
    level = np.searchsorted(negatives, s[pos], side="right") - below  # (n_pos,) ties
    return float((int(below.sum()) + int(level.sum()) / 2) / (n_pos * n_neg))


def pr_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) when flagging `score >= threshold`, one point per distinct score,
    highest threshold first. Shapes (T,)."""
    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, p = s[order], pos[order]
    tp, fp = np.cumsum(p), np.cumsum(~p)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last cell of each distinct score
    recall = tp[last] / max(int(pos.sum()), 1)
    precision = tp[last] / (tp[last] + fp[last])
    return recall, precision, s[last]


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall steps: sum of (recall gained) x (precision there)."""
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
