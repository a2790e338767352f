import pytest
import yaml

from lathe.data.raw import generate_raw
from lathe.errors import DATA_ERROR_EXIT
from stages import ingest as stage
from tests.tiny import tiny_params


def write_params(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stage_writes_declared_outputs(tmp_path):
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    params = write_params(tmp_path, tiny_params())
    stage.main([str(tmp_path / "raw"), str(tmp_path / "prep"), "--params", str(params)])
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == [
        "manifest.csv", "task.json", "test.safetensors", "train.safetensors", "val.safetensors"]


def test_unreadable_image_exits_with_the_data_error_status_naming_the_file(tmp_path, capsys):
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    victim = sorted((tmp_path / "raw" / "images").iterdir())[0]
    victim.write_bytes(b"\x89PNG garbage")
    params = write_params(tmp_path, tiny_params())
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "raw"), str(tmp_path / "prep"), "--params", str(params)])
    assert exit_info.value.code == DATA_ERROR_EXIT
    err = capsys.readouterr().err
    assert "[ingest] FAILED" in err and victim.name in err
    assert not (tmp_path / "prep").exists()


def test_params_typo_exits_1_naming_the_key(tmp_path, capsys):
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    params = write_params(tmp_path, tiny_params(ingest={"imagesize": 16}))
    with pytest.raises(SystemExit):
        stage.main([str(tmp_path / "raw"), str(tmp_path / "prep"), "--params", str(params)])
    assert "ingest.imagesize" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "abc"])
def test_a_bad_seed_is_a_config_error_naming_the_key_not_a_traceback(tmp_path, capsys, seed):
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    params = write_params(tmp_path, tiny_params(ingest={"seed": seed}))
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "raw"), str(tmp_path / "prep"), "--params", str(params)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "ingest.seed" in err and "Traceback" not in err


def test_an_os_error_names_the_file_in_one_line_and_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    params = write_params(tmp_path, tiny_params())
    (tmp_path / "blocker").write_text("a file where the output's parent folder should be")
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "raw"), str(tmp_path / "blocker" / "prep"), "--params", str(params)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1
    assert len(err.splitlines()) == 1 and err.startswith("[ingest] FAILED") and "blocker" in err, err
    assert "Traceback" not in err
    assert "Traceback" in (tmp_path / ".lathe" / "logs" / "ingest.traceback.txt").read_text()


def test_every_bad_row_and_file_is_named_at_once_with_the_data_error_status(tmp_path, capsys):
    generate_raw(tmp_path / "raw", per_class_type=3, size=32)
    labels = tmp_path / "raw" / "labels.csv"
    lines = labels.read_text().splitlines()
    (tmp_path / "raw" / lines[1].split(",")[0]).unlink()
    lines[2] = lines[2].split(",")[0] + ",scrap,0.5,mono"
    lines[3] = lines[3].split(",")[0] + ",functional,0.0,"
    labels.write_text("\n".join(lines + [lines[4]]) + "\n")
    params = write_params(tmp_path, tiny_params())
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "raw"), str(tmp_path / "prep"), "--params", str(params)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == DATA_ERROR_EXIT and "Traceback" not in "\n".join(err)
    assert err[0].startswith("[ingest] FAILED: 4 problem(s) in ") and len(err) == 5, err
    assert [line.split(": ", 1)[1] for line in err[1:]] == [
        "label 'scrap' is not one of data.classes (functional, possibly_defective, probably_defective, defective)",
        "empty cell_type (params data.stratify/data.group use it)",
        "file listed again (first on line 5)",
        f"file not found ({tmp_path / 'raw' / lines[1].split(',')[0]})",
    ]
    assert not (tmp_path / "prep").exists()
