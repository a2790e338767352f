import json
import shutil
import sys

import pytest
import yaml

from lathe.data.contract import DataParams
from lathe.data.ingest import ingest, read_manifest, write_prepared
from lathe.data.params import IngestParams
from lathe.data.raw import generate_raw
from lathe.errors import DATA_ERROR_EXIT
from stages import validate as stage
from tests.tiny import ROOT, sh, tiny_params


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Generated raw data ingested with the tiny params."""
    root = tmp_path_factory.mktemp("clean")
    generate_raw(root / "raw", per_class_type=6, size=32)
    cfg = IngestParams(**tiny_params()["ingest"])
    rows, images, task = ingest(root / "raw", cfg, DataParams(**tiny_params()["data"]))
    write_prepared(root / "prep", rows, images, task)
    return root


@pytest.fixture()
def work(clean, tmp_path):
    shutil.copytree(clean / "raw", tmp_path / "raw")
    shutil.copytree(clean / "prep", tmp_path / "prep")
    return tmp_path


def write_params(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def argv(root, params):
    return [str(root / "prep"), str(root / "raw"), str(root / "out"), "--params", str(params)]


def test_stage_passes_and_writes_both_reports(work):
    stage.main(argv(work, write_params(work, tiny_params())))  # returns: exit 0
    assert sorted(p.name for p in (work / "out").iterdir()) == ["result.json", "summary.md"]
    assert json.loads((work / "out" / "result.json").read_text())["success"] is True


def test_failed_gate_exits_with_the_data_error_status_naming_the_file_and_still_writes_reports(work, capsys):
    victim = read_manifest(work / "prep" / "manifest.csv")[0]["file"]
    (work / "raw" / victim).unlink()
    with pytest.raises(SystemExit) as exit_info:
        stage.main(argv(work, write_params(work, tiny_params())))
    assert exit_info.value.code == DATA_ERROR_EXIT
    err = capsys.readouterr().err
    assert "[validate] FAILED" in err and "raw_files_exist" in err and victim in err
    result = json.loads((work / "out" / "result.json").read_text())
    assert result["success"] is False and result["failed"] == ["raw_files_exist"]
    assert victim in (work / "out" / "summary.md").read_text()


def test_image_size_is_read_from_the_ingest_section(work, capsys):
    params = write_params(work, tiny_params(ingest={"image_size": 32}))
    with pytest.raises(SystemExit):
        stage.main(argv(work, params))
    assert "task.json: image size 16, but params ingest.image_size is 32" in capsys.readouterr().err


def test_params_typo_exits_1_naming_the_key(work, capsys):
    params = write_params(work, tiny_params(validate={"min_row": 5}))
    with pytest.raises(SystemExit) as exit_info:
        stage.main(argv(work, params))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "validate.min_row" in err and "unknown key" in err
    assert not (work / "out").exists()


def test_cli_as_dvc_calls_it_exits_with_the_data_error_status_and_a_quiet_stderr(work):
    """The exact dvc.yaml command in a fresh process (pays the GE import once more, ~5 s)."""
    (work / "raw" / read_manifest(work / "prep" / "manifest.csv")[1]["file"]).write_bytes(b"changed")
    params = write_params(work, tiny_params())
    res = sh(ROOT, sys.executable, "-m", "stages.validate", *argv(work, params), check=False)
    assert res.returncode == DATA_ERROR_EXIT
    assert "raw_sha256_match" in res.stderr
    # GE's own INFO logging and progress bars are muted: only our lines reach stderr
    assert all(line.startswith(("[validate]", "  ")) for line in res.stderr.splitlines()), res.stderr
    assert (work / "out" / "result.json").is_file() and (work / "out" / "summary.md").is_file()
