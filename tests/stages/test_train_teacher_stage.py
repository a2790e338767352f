import pytest
import yaml

from lathe.config import IngestParams
from lathe.data import generate_raw
from lathe.ingest import ingest, write_prepared
from stages import train_teacher as stage
from tests.tiny import TINY_PARAMS, tiny_params


@pytest.fixture()
def prepared(tmp_path):
    generate_raw(tmp_path / "raw", per_class_type=6, size=32)
    cfg = IngestParams(**TINY_PARAMS["ingest"])
    rows, images = ingest(tmp_path / "raw", cfg)
    write_prepared(tmp_path / "prep", rows, images, cfg)
    return tmp_path / "prep"


def run(tmp_path, prepared, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stage.main([str(prepared), str(tmp_path / "teacher"), str(tmp_path / "hist.csv"), "--params", str(path)])


def test_stage_writes_model_folder_and_history(tmp_path, prepared):
    run(tmp_path, prepared, tiny_params(train_teacher={"epochs": 1}))
    assert (tmp_path / "teacher" / "model.onnx").is_file()
    assert (tmp_path / "hist.csv").read_text().startswith("epoch,train_loss")


def test_missing_prepared_split_exits_1_naming_the_file(tmp_path, prepared, capsys):
    (prepared / "val.safetensors").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, prepared, tiny_params())
    assert exit_info.value.code == 1
    assert "val.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "teacher").exists()


def test_bad_arch_exits_1_with_the_reason(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, prepared, tiny_params(train_teacher={"arch": {"widths": [8], "blocks": [1, 1]}}))
    assert "equal length" in capsys.readouterr().err
