import pytest
import yaml

from lathe.errors import DATA_ERROR_EXIT
from stages import train_teacher as stage
from tests.tiny import make_prepared, tiny_params


@pytest.fixture()
def prepared(tmp_path):
    return make_prepared(tmp_path)


def run(tmp_path, prepared, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stage.main([str(prepared), str(tmp_path / "teacher"), str(tmp_path / "hist.csv"), "--params", str(path)])


def test_stage_writes_model_folder_and_history(tmp_path, prepared):
    run(tmp_path, prepared, tiny_params(train_teacher={"epochs": 1}))
    assert (tmp_path / "teacher" / "model.onnx").is_file()
    assert (tmp_path / "hist.csv").read_text().startswith("epoch,train_loss")


def test_ensemble_stage_logs_every_member_and_records_them(tmp_path, prepared, caplog):
    import json
    import logging

    caplog.set_level(logging.INFO)
    run(tmp_path, prepared, tiny_params(train_teacher={"epochs": 1, "ensemble": {"members": 2}}))
    lines = [r.getMessage() for r in caplog.records if "epoch " in r.getMessage() and "best" not in r.getMessage()]
    assert [line.split("  ")[0] for line in lines] == ["member 1/2", "member 2/2", "distilled"]
    summary = json.loads((tmp_path / "teacher" / "train.json").read_text())
    assert len(summary["ensemble_members_best_val"]) == 2


def test_missing_prepared_split_exits_with_the_data_error_status_naming_the_file(tmp_path, prepared, capsys):
    (prepared / "val.safetensors").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, prepared, tiny_params())
    assert exit_info.value.code == DATA_ERROR_EXIT
    assert "val.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()


def test_bad_arch_exits_1_with_the_reason(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, prepared, tiny_params(train_teacher={"arch": {"widths": [8], "blocks": [1, 1]}}))
    assert "equal length" in capsys.readouterr().err
