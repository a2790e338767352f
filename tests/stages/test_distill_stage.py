import json
import logging

import pytest
import yaml
from safetensors.torch import save as save_tensors

from lathe.io import write_bytes, write_json
from lathe.model.arch import build_model
from lathe.model.params import TrainParams
from lathe.model.teacher import FILES, arch_document
from stages import distill as stage
from tests.tiny import TINY_PARAMS, make_prepared, tiny_params

MODEL_FILES = {FILES.weights, FILES.arch, FILES.onnx, FILES.summary, "distill.json"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Prepared tiny data and an (untrained) tiny teacher folder; the stage only reads them."""
    root = tmp_path_factory.mktemp("inputs")
    make_prepared(root)
    # untrained, and only arch + weights: the stage never runs the teacher's ONNX
    spec = TrainParams(**TINY_PARAMS["train_teacher"]).arch
    teacher = build_model(spec, 16)
    write_json(root / "teacher" / FILES.arch, arch_document(spec, 16))
    write_bytes(root / "teacher" / FILES.weights, save_tensors({k: v.contiguous() for k, v in teacher.state_dict().items()}))
    return root


def run(tmp_path, inputs, params, *extra, control=False):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    head = ["--control"] if control else [str(inputs / "teacher")]
    stage.main([*head, str(inputs / "prepared"), str(tmp_path / "out"), str(tmp_path / "hist.csv"), "--params", str(path), *extra])


def test_distill_stage_writes_only_its_outs_with_one_log_line_per_epoch(tmp_path, inputs, caplog):
    caplog.set_level(logging.INFO, logger="stages.distill")
    run(tmp_path, inputs, tiny_params())
    assert {p.name for p in tmp_path.iterdir()} == {"params.yaml", "out", "hist.csv"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == MODEL_FILES
    record = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert record["mode"] == "distill" and record["teacher_params"] > record["student_params"]
    assert (tmp_path / "hist.csv").read_text().startswith("epoch,train_loss")
    assert sum(r.getMessage().startswith("epoch ") for r in caplog.records if r.name == "stages.distill") == TINY_PARAMS["distill"]["epochs"]


def test_control_stage_runs_without_a_teacher(tmp_path, inputs):
    run(tmp_path, inputs, tiny_params(distill={"epochs": 1, "alpha": 1.0}), control=True)
    assert {p.name for p in (tmp_path / "out").iterdir()} == MODEL_FILES
    record = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert record["mode"] == "control" and record["teacher_params"] is None and record["alpha"] is None
    assert len((tmp_path / "hist.csv").read_text().splitlines()) == 2


def test_student_larger_than_teacher_exits_1_naming_the_key_and_counts(tmp_path, inputs, capsys):
    big = {"stem_channels": 16, "stem_stride": 1, "widths": [16, 32], "blocks": [1, 1]}
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, inputs, tiny_params(distill={"student": big}))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[distill] FAILED: distill.student has" in err and "teacher's 5,020" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "hist.csv").exists()


def test_missing_teacher_exits_1_naming_the_file(tmp_path, inputs, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params()))
    with pytest.raises(SystemExit) as exit_info:
        stage.main([str(tmp_path / "no_teacher"), str(inputs / "prepared"), str(tmp_path / "out"), str(tmp_path / "h.csv"),
                    "--params", str(path)])
    assert exit_info.value.code == 1
    assert "no_teacher: teacher folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_params_key_exits_1_naming_it(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, inputs, tiny_params(distill={"temprature": 2.0}), control=True)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[distill_control] FAILED" in err and "distill.temprature: unknown key" in err


def test_pruned_init_without_init_dir_exits_1(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, inputs, tiny_params(distill={"init": "pruned"}))
    assert "--init-dir" in capsys.readouterr().err
