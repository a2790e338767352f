import json

import pytest
import yaml

from stages import lowrank as stage
from tests.tiny import make_prepared, make_teacher, tiny_params


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(teacher_dir, prepared_dir) of a tiny one-epoch teacher."""
    root = tmp_path_factory.mktemp("lowrank_stage")
    prepared = make_prepared(root)
    return make_teacher(root, prepared), prepared


def run(tmp_path, teacher_dir, prepared, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stage.main([str(teacher_dir), str(prepared), str(tmp_path / "lowrank"), str(tmp_path / "lowrank.csv"), "--params", str(path)])


def test_stage_writes_lowrank_folder_record_and_history(tmp_path, teacher, caplog):
    caplog.set_level("INFO")
    run(tmp_path, *teacher, tiny_params())
    assert {p.name for p in (tmp_path / "lowrank").iterdir()} == {
        "weights.safetensors", "arch.json", "model.onnx", "train.json", "lowrank.json"}
    assert (tmp_path / "lowrank.csv").read_text().startswith("epoch,train_loss")
    assert json.loads((tmp_path / "lowrank" / "arch.json").read_text())["spec"]["ranks"]
    assert "epoch  1/1" in caplog.text and "layers factorised" in caplog.text


def test_missing_teacher_weights_exit_1_naming_the_file(tmp_path, teacher, capsys):
    broken = tmp_path / "teacher"
    broken.mkdir()
    (broken / "arch.json").write_text((teacher[0] / "arch.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, broken, teacher[1], tiny_params())
    assert exit_info.value.code == 1
    assert "weights.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "lowrank").exists()


def test_nothing_to_factorise_exits_1_naming_the_keys(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, *teacher, tiny_params(lowrank={"energy": 1.0}))
    assert "lowrank.energy" in capsys.readouterr().err
    assert not (tmp_path / "lowrank").exists()
