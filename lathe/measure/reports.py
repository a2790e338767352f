"""The evaluate stage's report files for one variant, and the one way to read them back.

    reports/<variant>/metrics.json    the headline figures (lathe.measure.metrics.HEADLINE_KEYS), flat numbers:
                                      the DVC metrics file, one row of `dvc metrics show` per variant
    reports/<variant>/detail.json     everything else: the other metrics (per class, per cell type,
                                      counts), the confusion matrix, and how latency was measured;
                                      not a DVC metrics file (it would add ~15 mostly empty columns)
    reports/<variant>/predictions.csv sample_id,label,predicted,p_defective per test sample
    reports/<variant>/confusion.png   the confusion matrix as a picture (lathe.measure.plots), a DVC image plot
    reports/<variant>/pr_curve.csv    recall,precision,threshold of the defect flag p_defective >= threshold,
                                      a DVC plot; pr_curve.png the same curve as a picture

Only metrics.json holds measured (machine-dependent) values; detail.json is a pure function of the
model, the data and the params. Readers (compare, package, bench) call `read_report`, which joins the
two into the flat dict the evaluate stage computed.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lathe.errors import LatheError
from lathe.io import read_json, write_bytes, write_json, write_text
from lathe.measure.intervals import Cells, cells_of
from lathe.measure.metrics import HEADLINE_KEYS

METRICS_FILE = "metrics.json"
DETAIL_FILE = "detail.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_PNG = "confusion.png"
PR_CURVE_CSV = "pr_curve.csv"  # recall,precision,threshold: a DVC plot (x recall, y precision)
PR_CURVE_PNG = "pr_curve.png"
DEFECTIVE_INDICES = "defective_indices"  # detail.json: the task's defective class indices, ascending
TIMING_METHOD = "timing_method"  # detail.json (and read_report's dict): how latency/throughput were measured


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headline, the rest) of a flat metrics dict; a missing headline key is an error."""
    missing = [k for k in HEADLINE_KEYS if k not in metrics]
    if missing:
        raise LatheError(f"evaluation lacks headline metrics {missing}")
    return ({k: metrics[k] for k in HEADLINE_KEYS},
            {k: v for k, v in metrics.items() if k not in HEADLINE_KEYS})


def detail_record(metrics: dict[str, Any], confusion: np.ndarray, timing_method: str,
                  defective_indices: Sequence[int]) -> dict[str, Any]:
    """detail.json: the non-headline metrics, the confusion matrix (rows: true class, columns:
    predicted; counts), the timing method, and which class indices are defects (so predictions.csv
    can be judged again, e.g. paired against another variant, without the task file)."""
    return {"metrics": split_metrics(metrics)[1], "confusion_matrix": np.asarray(confusion, dtype=np.int64).tolist(),
            TIMING_METHOD: timing_method, DEFECTIVE_INDICES: [int(i) for i in defective_indices]}


def predictions_csv(sample_ids: np.ndarray, labels: np.ndarray, predicted: np.ndarray, p_defective: np.ndarray) -> str:
    """`sample_id,label,predicted,p_defective` per test sample; p_defective to 6 decimals."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("sample_id", "label", "predicted", "p_defective"))
    writer.writerows((int(s), int(y), int(p), f"{q:.6f}") for s, y, p, q in zip(sample_ids, labels, predicted,
                                                                               p_defective, strict=True))
    return buf.getvalue()


def pr_curve_csv(recall: np.ndarray, precision: np.ndarray, threshold: np.ndarray) -> str:
    """`recall,precision,threshold` per distinct defect score, highest threshold first; 6 decimals."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("recall", "precision", "threshold"))
    writer.writerows((f"{r:.6f}", f"{p:.6f}", f"{t:.6f}") for r, p, t in zip(recall, precision, threshold, strict=True))
    return buf.getvalue()


def write_reports(out_dir: Path, metrics: dict[str, Any], detail: dict[str, Any], predictions: str,
                  pictures: dict[str, bytes], pr_csv: str) -> None:
    """Atomically write predictions.csv, pr_curve.csv, the pictures (file name -> PNG bytes), detail.json
    and (last) metrics.json into `out_dir`."""
    out_dir = Path(out_dir)
    headline = split_metrics(metrics)[0]
    write_text(out_dir / PREDICTIONS_FILE, predictions)
    write_text(out_dir / PR_CURVE_CSV, pr_csv)
    for name, png in sorted(pictures.items()):
        write_bytes(out_dir / name, png)
    write_json(out_dir / DETAIL_FILE, detail)
    write_json(out_dir / METRICS_FILE, headline)


def _read_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LatheError(f"{path}: not found; the evaluate stage writes it (run it for this variant)")
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LatheError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LatheError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_report(report_dir: Path) -> dict[str, Any]:
    """Every metric of one evaluated variant as one flat dict: metrics.json's headline figures, detail.json's
    other metrics, and `timing_method` (a string). Errors name the file; which keys a reader needs, it checks."""
    report_dir = Path(report_dir)
    headline = _read_object(report_dir / METRICS_FILE)
    detail = _read_object(report_dir / DETAIL_FILE)
    bad = [k for k, v in headline.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)]
    if bad:
        raise LatheError(f"{report_dir / METRICS_FILE}: {bad} are not finite numbers")
    rest, method = detail.get("metrics"), detail.get(TIMING_METHOD)
    if not isinstance(rest, dict) or not isinstance(method, str):
        raise LatheError(f"{report_dir / DETAIL_FILE}: expected 'metrics' (an object) and '{TIMING_METHOD}' "
                         f"(a string); rerun the evaluate stage for this variant")
    return {**rest, **headline, TIMING_METHOD: method}


def read_cells(report_dir: Path) -> Cells:
    """The variant's per-cell outcomes on the test split (predictions.csv, sorted by sample id) with the
    defective classes from detail.json: what paired comparisons between variants need."""
    report_dir = Path(report_dir)
    detail = _read_object(report_dir / DETAIL_FILE)
    defective, confusion = detail.get(DEFECTIVE_INDICES), detail.get("confusion_matrix")
    if not isinstance(defective, list) or not isinstance(confusion, list):
        raise LatheError(f"{report_dir / DETAIL_FILE}: no '{DEFECTIVE_INDICES}' or confusion matrix; rerun the "
                         "evaluate stage for this variant")
    path = report_dir / PREDICTIONS_FILE
    try:
        with open(path, newline="") as fh:
            rows = sorted((int(r["sample_id"]), int(r["label"]), int(r["predicted"])) for r in csv.DictReader(fh))
    except FileNotFoundError as exc:
        raise LatheError(f"{path}: not found; the evaluate stage writes it") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise LatheError(f"{path}: not sample_id,label,predicted,p_defective rows of integers ({exc})") from exc
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return cells_of(table[:, 1], table[:, 2], defective, len(confusion))
