import json

import pytest
import torch
from safetensors.torch import save as save_tensors

from lathe.compress.distill import RECORD, control_student, distill_student, make_student
from lathe.compress.params import DistillParams
from lathe.compress.result import write_compressed
from lathe.config import parse_section
from lathe.data.contract import read_task
from lathe.data.ingest import load_split
from lathe.errors import ConfigError, LatheError
from lathe.io import write_bytes, write_json
from lathe.model.arch import build_model
from lathe.model.params import ArchSpec, TrainParams
from lathe.model.teacher import FILES, arch_document, load_model, train_teacher
from lathe.model.train import to_tensor
from tests.tiny import TINY_PARAMS, make_prepared


def write_arch_and_weights(folder, model, spec, image_size):
    """The two files load_model needs (no ONNX export: keeps the fixtures fast)."""
    write_json(folder / FILES.arch, arch_document(spec, image_size))
    write_bytes(folder / FILES.weights, save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}))


def tiny_cfg(**overrides) -> DistillParams:
    return DistillParams(**{**TINY_PARAMS["distill"], **overrides})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny prepared data (16 px) and a tiny teacher folder (5k params, one epoch of training)."""
    root = tmp_path_factory.mktemp("distill")
    prepared = make_prepared(root)
    # trained like tests.tiny.make_teacher, but only arch + weights are written (no ONNX export)
    tcfg = TrainParams(**{**TINY_PARAMS["train_teacher"], "epochs": 1})
    teacher, _, size = train_teacher(prepared, tcfg)
    write_arch_and_weights(root / "teacher", teacher, tcfg.arch, size)
    return root


@pytest.fixture(scope="module")
def first_student(inputs, tmp_path_factory):
    """One distilled student folder, shared by the end-to-end and determinism tests."""
    out = tmp_path_factory.mktemp("student") / "a"
    run = distill_student(inputs / "teacher", inputs / "prepared", tiny_cfg())
    record = write_compressed(out, run, load_split(inputs / "prepared", "val")["images"])
    return out, run, record


# distill end to end


def test_distill_writes_a_smaller_student_with_its_record(inputs, first_student):
    out, run, record = first_student
    assert {p.name for p in out.iterdir()} == {FILES.weights, FILES.arch, FILES.onnx, FILES.summary, RECORD}
    assert json.loads((out / RECORD).read_text()) == record
    assert record["mode"] == "distill" and record["init"] == "scratch"
    assert record["student_arch_source"] == "distill.student" and record["student_arch_ignored"] is None
    assert record["teacher_params"] == 5020 and record["student_params"] == 1328
    assert record["compression_ratio"] == round(5020 / 1328, 3)
    assert (record["temperature"], record["alpha"]) == (4.0, 0.7)
    assert 1 <= record["best_epoch"] <= 2 and set(record["best_val"]) == set(record["teacher_val"])
    assert record["onnx_check"] == {"max_abs_diff_limit": 1e-4, "passed": True}
    assert run.spec == tiny_cfg().student and len(run.fit.history) == 2
    x = to_tensor(load_split(inputs / "prepared", "val")["images"])
    with torch.no_grad():
        assert torch.equal(load_model(out)(x), run.model.eval()(x))


def test_two_distills_give_byte_identical_onnx_and_weights(inputs, first_student, tmp_path):
    run = distill_student(inputs / "teacher", inputs / "prepared", tiny_cfg())
    write_compressed(tmp_path / "b", run, load_split(inputs / "prepared", "val")["images"])
    for name in (FILES.onnx, FILES.weights, RECORD):
        assert (tmp_path / "b" / name).read_bytes() == (first_student[0] / name).read_bytes()


def test_control_is_the_same_student_and_budget_without_the_teacher(inputs, first_student):
    control = control_student(inputs / "prepared", tiny_cfg())
    assert control.record["mode"] == "control" and control.record["teacher_params"] is None
    assert control.record["student_params"] == 1328 and len(control.fit.history) == 2
    # With alpha = 0 distillation reduces to the control: same init, batches, augmentation, dropout.
    plain = distill_student(inputs / "teacher", inputs / "prepared", tiny_cfg(alpha=0.0))
    a, b = control.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    distilled = first_student[1].model.state_dict()  # alpha = 0.7: the teacher changed the outcome
    assert not all(torch.equal(a[k], distilled[k]) for k in a)


def test_pruned_init_takes_the_pruned_architecture_and_weights(inputs, tmp_path):
    spec = ArchSpec(stem_channels=6, stem_stride=1, widths=[6, 12], blocks=[1, 1])
    torch.manual_seed(1)
    pruned = build_model(spec, 16)
    write_arch_and_weights(tmp_path / "pruned", pruned, spec, 16)
    cfg = tiny_cfg(init="pruned", epochs=1)
    start = make_student(cfg, read_task(inputs / "prepared"), tmp_path / "pruned")
    assert start.spec == spec and start.source.endswith("arch.json")
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in start.model.state_dict().items())
    run = distill_student(inputs / "teacher", inputs / "prepared", cfg, init_dir=tmp_path / "pruned")
    assert run.spec == spec and run.record["student_arch_ignored"] == "distill.student"
    assert run.record["init"] == "pruned" and len(run.record["init_weights_sha256"]) == 64


# failure paths


def test_student_not_smaller_than_teacher_is_refused_with_both_counts(inputs):
    big = {"stem_channels": 16, "stem_stride": 1, "widths": [16, 32], "blocks": [1, 1]}
    with pytest.raises(ConfigError, match=r"distill\.student has [\d,]+ parameters, not fewer than the teacher's 5,020"):
        distill_student(inputs / "teacher", inputs / "prepared", tiny_cfg(student=big))


def test_student_must_match_the_teachers_classes_and_the_data_channels(inputs):
    small = TINY_PARAMS["distill"]["student"]
    with pytest.raises(ConfigError, match=r"distill\.student\.num_classes is 3 but the data has 4 \(data\.classes"):
        distill_student(inputs / "teacher", inputs / "prepared", tiny_cfg(student={**small, "num_classes": 3}))
    with pytest.raises(ConfigError, match=r"distill\.student\.in_channels is 3 but the data has 1 \(data.channels\)"):
        control_student(inputs / "prepared", tiny_cfg(student={**small, "in_channels": 3}))


def test_missing_teacher_is_named(inputs, tmp_path):
    with pytest.raises(LatheError, match=r"nowhere: teacher folder not found"):
        distill_student(tmp_path / "nowhere", inputs / "prepared", tiny_cfg())


def test_pruned_init_without_a_folder_is_refused(inputs):
    with pytest.raises(ConfigError, match="distill.init is 'pruned'.*--init-dir"):
        control_student(inputs / "prepared", tiny_cfg(init="pruned"))


def test_bad_params_key_is_named():
    with pytest.raises(ConfigError, match=r"distill\.temprature: unknown key; allowed keys here: .*temperature"):
        parse_section({"distill": {"temprature": 2.0}}, "distill", DistillParams)
    with pytest.raises(ConfigError, match=r"distill\.student\.widths"):
        parse_section({"distill": {"student": {"widths": "wide"}}}, "distill", DistillParams)
    with pytest.raises(ConfigError, match=r"distill\.alpha"):
        parse_section({"distill": {"alpha": 1.5}}, "distill", DistillParams)
