import json

import pytest
import yaml

from lathe.measure.evaluate import evaluate_model
from lathe.measure.params import EvaluateParams
from stages import quantize as stage
from tests.lathe.compress.test_quantize import write_model, write_prepared
from tests.lathe.measure.test_evaluate import write_test_split
from tests.tiny import tiny_params


def run(tmp_path, params=None):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params or tiny_params()))
    stage.main([str(tmp_path / "models" / "student"), str(tmp_path / "prepared"),
                str(tmp_path / "models" / "quantized" / "student"), "--params", str(path)])
    return tmp_path / "models" / "quantized" / "student"


def test_stage_writes_an_int8_model_that_evaluates_and_its_record(tmp_path, caplog):
    write_model(tmp_path / "models" / "student")
    write_prepared(tmp_path / "prepared")
    caplog.set_level("INFO")
    out = run(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "quantize.json"]
    record = json.loads((out / "quantize.json").read_text())
    assert len(record["calibration"]["sample_ids"]) == tiny_params()["quantize"]["calibration_size"]
    assert record["node_types"]["QuantizeLinear"] > 0
    assert "calibration ids sha256" in caplog.text
    # the evaluate stage reads the quantized folder like any other variant
    write_test_split(tmp_path / "prepared", n=8)
    metrics = evaluate_model(out, tmp_path / "prepared", EvaluateParams(latency_warmup=0, latency_runs=2,
                                                                       throughput_batch=4, throughput_runs=1)).metrics
    assert metrics["size_bytes"] == (out / "model.onnx").stat().st_size and metrics["n_test"] == 8


def test_missing_model_exits_1_naming_the_file(tmp_path, capsys):
    (tmp_path / "models" / "student").mkdir(parents=True)
    write_prepared(tmp_path / "prepared")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[quantize] FAILED" in err and "student/model.onnx" in err
    assert not (tmp_path / "models" / "quantized").exists()


def test_calibration_size_above_the_train_split_exits_1_naming_the_key(tmp_path, capsys):
    write_model(tmp_path / "models" / "student")
    write_prepared(tmp_path / "prepared", n_train=6)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "quantize.calibration_size = 8" in err and "6 samples" in err
    assert not (tmp_path / "models" / "quantized").exists()


def test_params_typo_exits_1_naming_the_key(tmp_path, capsys):
    write_model(tmp_path / "models" / "student")
    write_prepared(tmp_path / "prepared")
    with pytest.raises(SystemExit):
        run(tmp_path, tiny_params(quantize={"method": "kl"}))
    assert "quantize.method" in capsys.readouterr().err
