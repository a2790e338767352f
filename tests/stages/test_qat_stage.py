import json
import logging

import pytest
import yaml
from safetensors.torch import save as save_tensors

from lathe.compress.qat import RECORD_FILE
from lathe.io import write_bytes, write_json
from lathe.measure.ort import MODEL_FILE
from lathe.model.arch import build_model
from lathe.model.params import ArchSpec, TrainParams
from lathe.model.teacher import FILES, arch_document
from stages import qat as stage
from tests.tiny import TINY_PARAMS, make_prepared, tiny_params


def write_untrained(folder, spec: ArchSpec, size: int = 16) -> None:
    """arch + weights of an untrained network (the stage never runs a source folder's ONNX)."""
    model = build_model(spec, size)
    write_json(folder / FILES.arch, arch_document(spec, size))
    write_bytes(folder / FILES.weights, save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prepared tiny data, an untrained tiny teacher and student."""
    root = tmp_path_factory.mktemp("inputs")
    make_prepared(root)
    write_untrained(root / "teacher", TrainParams(**TINY_PARAMS["train_teacher"]).arch)
    write_untrained(root / "student", ArchSpec(**TINY_PARAMS["distill"]["student"]))
    return root


def run(tmp_path, inputs, params, *extra):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    stage.main([str(inputs / "student"), str(inputs / "prepared"), str(tmp_path / "out"), str(tmp_path / "hist.csv"),
                "--teacher-dir", str(inputs / "teacher"), "--params", str(path), *extra])


def test_qat_stage_writes_its_outs_with_one_log_line_per_epoch(tmp_path, inputs, caplog):
    caplog.set_level(logging.INFO, logger="stages.qat")
    run(tmp_path, inputs, tiny_params(qat={"epochs": 2}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MODEL_FILE, RECORD_FILE]
    record = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert record["settings"]["epochs"] == 2 and record["teacher"] is not None
    assert (tmp_path / "hist.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    assert len((tmp_path / "hist.csv").read_text().splitlines()) == 3
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epochs) == 2 and "left)" in epochs[-1]
    assert "distilled from" in caplog.text and "0 compute nodes left float" in caplog.text


def test_params_typo_exits_1_naming_the_key(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, inputs, tiny_params(qat={"epoch": 2}))
    assert exit_info.value.code == 1
    assert "[qat] FAILED" in (err := capsys.readouterr().err) and "qat.epoch: unknown key" in err
    assert not (tmp_path / "out").exists()


def test_missing_student_exits_1_naming_the_file(tmp_path, inputs, capsys):
    (tmp_path / "student").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "student"), str(inputs / "prepared"), str(tmp_path / "out"), str(tmp_path / "h.csv"),
                    "--params", str(params)])
    assert exit_info.value.code == 1
    assert "[qat] FAILED" in (err := capsys.readouterr().err) and "student/arch.json: float model file missing" in err
    assert not (tmp_path / "out").exists()
