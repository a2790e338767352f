"""Evaluate one ONNX model variant through onnxruntime: quality on the test split, size, cost, speed.

Every variant (teacher, pruned, student, quantized) is judged the same way, from its deployable
artifact only: `model.onnx` plus any external-data files it references, read and run with the helpers
of `lathe.measure.ort`. Nothing here imports torch.

Quality metrics, and their 95% bootstrap intervals over the test cells (lathe.measure.intervals), are
deterministic for a given model and params; latency and throughput are measurements and vary run to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lathe.data.contract import Task, read_task
from lathe.data.ingest import image_geometry, load_split
from lathe.errors import DataError, LatheError
from lathe.measure.intervals import cells_of, interval_fields, intervals
from lathe.measure.metrics import (
    accuracy,
    average_precision,
    balanced_accuracy,
    binary_defect_metrics,
    confusion_matrix,
    latency_method,
    macro_f1,
    per_class_recall,
    pr_curve,
    roc_auc,
)
from lathe.measure.ort import (
    MODEL_FILE,
    check_input,
    count_onnx_macs,
    count_onnx_params,
    fixed_batch,
    load_proto,
    load_session,
    measure_latency,
    measure_throughput,
    model_files,
    predict,
    softmax,
)
from lathe.measure.params import EvaluateParams

TEST_SPLIT = "test"


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics (flat, numbers only) and per-sample predictions on the test split, in split order."""

    metrics: dict[str, float | int]
    sample_ids: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64 true class
    predicted: np.ndarray  # (N,) int64 argmax class
    p_defective: np.ndarray  # (N,) float64 softmax mass on the defective classes (task.defective)
    confusion: np.ndarray  # (K, K) int64 counts; rows true class, columns predicted
    timing_method: str  # how latency and throughput were measured (lathe.measure.metrics.latency_method)


# ---------------------------------------------------------------------------------------------
# Metrics


def quality_metrics(labels: np.ndarray, logits: np.ndarray, task: Task) -> dict[str, float | int]:
    """Test-split quality from logits (N, K): K-class, recall per class by name (`recall_<class>`), and
    defective (task.defective) against good.

    All values are fractions in [0, 1] (a metric with no samples to judge is 0, never NaN), plus
    the sample count.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = logits.shape[1]
    predicted = np.argmax(logits, axis=1)
    cm = confusion_matrix(labels, predicted, num_classes)
    out: dict[str, float | int] = {
        "accuracy": accuracy(cm),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
    }
    for name, r in zip(task.classes, per_class_recall(cm)):
        out[recall_key(name)] = float(r)
    out.update(binary_defect_metrics(labels, predicted, task.defective_indices))
    out["n_test"] = int(len(labels))
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def recall_key(class_name: str) -> str:
    """The metrics key of one class's recall."""
    return f"recall_{class_name}"


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate_model(model_dir: Path, prepared_dir: Path, cfg: EvaluateParams) -> EvaluationResult:
    """Evaluate `model_dir/model.onnx` on the prepared test split; nothing is written."""
    onnx_path = Path(model_dir) / MODEL_FILE
    split_path = Path(prepared_dir) / f"{TEST_SPLIT}.safetensors"
    files = model_files(onnx_path)  # also: exists, parses, external data stays inside the folder
    test, task = load_split(prepared_dir, TEST_SPLIT), read_task(prepared_dir)
    images, labels = test["images"], test["labels"].astype(np.int64)
    if len(labels) == 0:
        raise DataError(f"{split_path}: the test split is empty; nothing to evaluate")
    channels, image_size = image_geometry(images, split_path)

    session = load_session(onnx_path, cfg.threads)
    check_input(session, image_size, onnx_path, split_path, channels)
    logits = predict(session, images)
    num_classes = logits.shape[1]
    if labels.max() >= num_classes or labels.min() < 0:
        raise DataError(f"{split_path}: labels span {labels.min()}..{labels.max()} but {onnx_path} "
                        f"outputs {num_classes} classes")
    if num_classes != task.num_classes:
        raise DataError(f"{onnx_path} outputs {num_classes} classes but the task has {task.num_classes} "
                        f"({', '.join(task.classes)})")

    # With external data loaded, shape inference can read shape constants stored outside the file.
    proto = load_proto(onnx_path, external_data=True)
    try:
        macs = count_onnx_macs(proto, image_size)
    except LatheError as exc:
        raise LatheError(f"{onnx_path}: {exc}") from exc
    metrics = quality_metrics(labels, logits, task)
    predicted = np.argmax(logits, axis=1).astype(np.int64)
    # 95% bootstrap intervals over the test cells (deterministic: fixed seed), reported beside the figures
    metrics.update(interval_fields(intervals(cells_of(labels, predicted, task.defective_indices, num_classes))))
    p50, p95 = measure_latency(session, image_size, cfg.latency_warmup, cfg.latency_runs)
    metrics.update({
        "size_bytes": sum(p.stat().st_size for p in files),
        "params": count_onnx_params(proto),
        "macs": macs,
        "latency_p50_ms": round(p50, 4),
        "latency_p95_ms": round(p95, 4),
        "throughput_ips": round(measure_throughput(session, image_size, cfg.throughput_batch, cfg.throughput_runs), 2),
    })
    p_defective = softmax(logits)[:, task.defective_indices].sum(axis=1)
    # ranking quality of the defect score, whatever threshold a package later picks (on the scores as
    # predictions.csv holds them, 6 decimals)
    metrics["defective_roc_auc"] = round(roc_auc(*defect_scores(labels, p_defective, task)), 6)
    metrics["defective_average_precision"] = round(
        average_precision(*pr_curve(*defect_scores(labels, p_defective, task))[:2]), 6)
    return EvaluationResult(
        metrics=metrics, sample_ids=test["sample_ids"].astype(np.int64), labels=labels,
        predicted=predicted, p_defective=p_defective, confusion=confusion_matrix(labels, predicted, num_classes),
        timing_method=timing_method(cfg, fixed_batch(session)),
    )


def defect_scores(labels: np.ndarray, p_defective: np.ndarray, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(truly defective, defect score) per test cell; the score as predictions.csv holds it (6 decimals)."""
    return np.isin(labels, task.defective_indices), np.round(p_defective, 6)


def defect_pr_curve(result: EvaluationResult, task: Task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, threshold) of the defect flag `p_defective >= threshold` on the test split."""
    return pr_curve(*defect_scores(result.labels, result.p_defective, task))


def timing_method(cfg: EvaluateParams, fixed: int | None = None) -> str:
    """How this stage times a model (`fixed`: the model's fixed batch size, if it has one)."""
    return (latency_method("evaluate stage", cfg.threads, cfg.latency_runs, cfg.latency_warmup,
                           "each model timed alone, in its own stage run", batch=fixed or 1)
            + f"; throughput: median of {cfg.throughput_runs} calls at batch {fixed or cfg.throughput_batch}")
