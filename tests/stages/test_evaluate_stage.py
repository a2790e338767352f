import csv
import json

import pytest
import yaml

from lathe.measure.metrics import HEADLINE_KEYS
from lathe.measure.reports import read_report
from stages import evaluate as stage
from tests.lathe.measure.test_evaluate import write_model_dir, write_test_split
from tests.tiny import tiny_params


def run(tmp_path, params=None):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params or tiny_params()))
    stage.main([str(tmp_path / "models" / "teacher"), str(tmp_path / "prepared"), str(tmp_path / "reports" / "teacher"),
                "--params", str(path)])
    return tmp_path / "reports" / "teacher"


def test_stage_writes_headline_detail_predictions_and_confusion_picture(tmp_path):
    write_model_dir(tmp_path / "models" / "teacher")
    write_test_split(tmp_path / "prepared", n=10)
    out = run(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "detail.json", "metrics.json", "pr_curve.csv",
                                                     "pr_curve.png", "predictions.csv"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == sorted(HEADLINE_KEYS) and metrics["params"] > 0 and metrics["macs"] > 0
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    report = read_report(out)
    assert report["n_test"] == 10 and report["timing_method"].startswith("evaluate stage: onnxruntime CPU, batch 1")
    detail = json.loads((out / "detail.json").read_text())
    assert sum(map(sum, detail["confusion_matrix"])) == 10
    png = (out / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"tIME" not in png
    with open(out / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert [int(r["sample_id"]) for r in preds] == list(range(100, 110))
    for key in ("defective_roc_auc", "defective_average_precision", "accuracy_ci95_low", "false_reject_rate_ci95_high"):
        assert 0 <= report[key] <= 1
    assert report["accuracy_ci95_low"] <= report["accuracy"] <= report["accuracy_ci95_high"]
    with open(out / "pr_curve.csv", newline="") as fh:
        curve = list(csv.DictReader(fh))
    assert float(curve[-1]["recall"]) == 1.0 and len(curve) <= 10
    # the pictures and the curve are the same bytes on a rerun (the timings in metrics.json are not)
    pr = (out / "pr_curve.png").read_bytes(), (out / "pr_curve.csv").read_bytes()
    assert run(tmp_path) and (out / "confusion.png").read_bytes() == png
    assert ((out / "pr_curve.png").read_bytes(), (out / "pr_curve.csv").read_bytes()) == pr


def test_missing_model_exits_1_naming_the_file(tmp_path, capsys):
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    write_test_split(tmp_path / "prepared")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[evaluate] FAILED" in err and "teacher/model.onnx" in err
    assert not (tmp_path / "reports").exists()


def test_image_size_mismatch_exits_1_with_both_sizes(tmp_path, capsys):
    write_model_dir(tmp_path / "models" / "teacher")
    write_test_split(tmp_path / "prepared", size=24)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "model.onnx" in err and "16x16" in err and "24x24" in err
    assert not (tmp_path / "reports").exists()


def test_params_typo_exits_1_naming_the_key(tmp_path, capsys):
    write_model_dir(tmp_path / "models" / "teacher")
    write_test_split(tmp_path / "prepared")
    with pytest.raises(SystemExit):
        run(tmp_path, tiny_params(evaluate={"latency_run": 3}))
    assert "evaluate.latency_run" in capsys.readouterr().err
