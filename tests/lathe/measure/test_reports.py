"""lathe.measure.reports: the evaluate stage's files, headline vs detail, and reading them back as one dict."""

import json

import numpy as np
import pytest

from lathe.errors import LatheError
from lathe.measure.evaluate import evaluate_model
from lathe.measure.metrics import HEADLINE_KEYS, TIMING_KEYS
from lathe.measure.reports import (
    CONFUSION_PNG,
    DETAIL_FILE,
    METRICS_FILE,
    PR_CURVE_CSV,
    PREDICTIONS_FILE,
    detail_record,
    pr_curve_csv,
    predictions_csv,
    read_report,
    split_metrics,
    write_reports,
)
from tests.lathe.measure.test_evaluate import FAST, write_model_dir, write_test_split

PNG = b"\x89PNG\r\n\x1a\n not drawn here"


def write(out, result):
    write_reports(out, result.metrics, detail_record(result.metrics, result.confusion, result.timing_method, [2, 3]),
                  predictions_csv(result.sample_ids, result.labels, result.predicted, result.p_defective),
                  {CONFUSION_PNG: PNG}, pr_curve_csv(np.array([1.0]), np.array([0.5]), np.array([0.1])))
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return evaluate_model(write_model_dir(tmp / "m"), write_test_split(tmp / "prep", n=5), FAST)


def test_headline_is_a_handful_of_numbers_and_detail_holds_the_rest(result, tmp_path):
    out = write(tmp_path / "out", result)
    assert sorted(p.name for p in out.iterdir()) == sorted([METRICS_FILE, DETAIL_FILE, PREDICTIONS_FILE, CONFUSION_PNG, PR_CURVE_CSV])
    headline, detail = json.loads((out / METRICS_FILE).read_text()), json.loads((out / DETAIL_FILE).read_text())
    # one `dvc metrics show` row per variant: the path column plus at most 11 figures
    assert list(headline) == sorted(HEADLINE_KEYS) and len(headline) <= 11
    assert set(TIMING_KEYS) <= set(headline)  # every measured value stays in the one measurement file
    assert not set(detail["metrics"]) & set(headline)
    assert {"recall_functional", "escape_rate", "macro_f1", "n_test"} <= set(detail["metrics"])
    assert detail["confusion_matrix"] == result.confusion.tolist() and detail["timing_method"] == result.timing_method
    assert (out / CONFUSION_PNG).read_bytes() == PNG


def test_read_report_gives_back_exactly_what_was_evaluated(result, tmp_path):
    out = write(tmp_path / "out", result)
    assert read_report(out) == {**result.metrics, "timing_method": result.timing_method}


def test_detail_is_free_of_measurements(result, tmp_path):
    """detail.json is the same bytes on every rerun (latency lives in metrics.json only)."""
    again = evaluate_model(write_model_dir(tmp_path / "m"), write_test_split(tmp_path / "prep", n=5), FAST)
    a, b = write(tmp_path / "a", result), write(tmp_path / "b", again)
    assert (a / DETAIL_FILE).read_bytes() == (b / DETAIL_FILE).read_bytes()
    assert (a / PREDICTIONS_FILE).read_bytes() == (b / PREDICTIONS_FILE).read_bytes()


def test_predictions_csv_has_one_row_per_sample_with_six_decimals(result):
    lines = predictions_csv(result.sample_ids, result.labels, result.predicted, result.p_defective).splitlines()
    assert lines[0] == "sample_id,label,predicted,p_defective" and len(lines) == 6
    assert lines[1].startswith("100,0,") and len(lines[1].split(",")[3].split(".")[1]) == 6


def test_split_refuses_an_evaluation_without_a_headline_figure():
    with pytest.raises(LatheError, match=r"lacks headline metrics \['latency_p50_ms'\]"):
        split_metrics({k: 1 for k in HEADLINE_KEYS if k != "latency_p50_ms"})


def test_read_report_names_the_file_that_is_missing_broken_or_incomplete(result, tmp_path):
    out = write(tmp_path / "out", result)
    (out / DETAIL_FILE).write_text(json.dumps({"metrics": {}}))
    with pytest.raises(LatheError, match=r"out/detail\.json: expected 'metrics' .* and 'timing_method'"):
        read_report(out)
    (out / METRICS_FILE).write_text(json.dumps({**{k: 1 for k in HEADLINE_KEYS}, "accuracy": float("nan")}))
    with pytest.raises(LatheError, match=r"out/metrics\.json: \['accuracy'\] are not finite numbers"):
        read_report(out)
    (out / METRICS_FILE).write_text("[1, 2")
    with pytest.raises(LatheError, match=r"out/metrics\.json: not valid JSON"):
        read_report(out)
    (out / METRICS_FILE).unlink()
    with pytest.raises(LatheError, match=r"out/metrics\.json: not found"):
        read_report(out)
    assert np.asarray(result.confusion).sum() == 5
