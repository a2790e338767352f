import json

import pytest
import yaml

from stages import prune as stage
from tests.tiny import make_prepared, make_teacher, tiny_params


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(teacher_dir, prepared_dir) of a tiny one-epoch teacher."""
    root = tmp_path_factory.mktemp("prune_stage")
    prepared = make_prepared(root)
    return make_teacher(root, prepared), prepared


def run(tmp_path, teacher_dir, prepared, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stage.main([str(teacher_dir), str(prepared), str(tmp_path / "pruned"), str(tmp_path / "pruned.csv"), "--params", str(path)])


def test_stage_writes_pruned_folder_record_and_history(tmp_path, teacher, caplog):
    caplog.set_level("INFO")
    run(tmp_path, *teacher, tiny_params())
    assert {p.name for p in (tmp_path / "pruned").iterdir()} == {
        "weights.safetensors", "arch.json", "model.onnx", "train.json", "prune.json"}
    assert (tmp_path / "pruned.csv").read_text().startswith("epoch,round,round_epoch,train_loss")
    assert json.loads((tmp_path / "pruned" / "prune.json").read_text())["macs_removed"] > 0.4
    logged = caplog.text
    assert "round 1/2:" in logged and "round 2 epoch  1/1" in logged


def test_missing_teacher_exits_1_naming_the_folder(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, tmp_path / "no_teacher", teacher[1], tiny_params())
    assert exit_info.value.code == 1
    assert "no_teacher: teacher folder not found" in capsys.readouterr().err
    assert not (tmp_path / "pruned").exists()


def test_ratio_that_empties_a_layer_exits_1_naming_the_key(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, *teacher, tiny_params(prune={"ratio": 0.99}))
    assert "prune.ratio = 0.99" in capsys.readouterr().err
    assert not (tmp_path / "pruned").exists()


def test_typo_in_params_exits_1_naming_the_key(tmp_path, teacher, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, *teacher, tiny_params(prune={"ratoi": 0.5}))
    assert "prune.ratoi" in capsys.readouterr().err
