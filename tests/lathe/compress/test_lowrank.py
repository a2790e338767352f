import json

import numpy as np
import onnx
import pytest
import torch

from lathe.compress.lowrank import RECORD, choose_rank, factorize, lowrank, lowrank_teacher, plan_ranks
from lathe.compress.params import LowRankParams
from lathe.compress.result import write_compressed
from lathe.config import parse_section
from lathe.data.contract import Task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.errors import ConfigError, LatheError
from lathe.model.arch import LowRankConv, build_model, count_macs, count_params
from lathe.model.params import ArchSpec
from lathe.model.teacher import FILES, load_model
from lathe.model.train import to_tensor
from tests.tiny import TINY_PARAMS, make_prepared, make_teacher

SPEC = ArchSpec(**TINY_PARAMS["train_teacher"]["arch"])

TASK = Task(classes=["a", "b", "c", "d"], defective=["c", "d"], image_size=16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained teacher folder and its prepared data: (teacher_dir, prepared_dir)."""
    root = tmp_path_factory.mktemp("lowrank")
    prepared = make_prepared(root)
    return make_teacher(root, prepared), prepared


def tiny_cfg(**overrides) -> LowRankParams:
    return LowRankParams(**{**TINY_PARAMS["lowrank"], **overrides})


def test_energy_rule_picks_the_smallest_rank_holding_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14
    assert choose_rank(s, 0.6) == 1 and choose_rank(s, 0.65) == 2 and choose_rank(s, 0.95) == 3
    assert choose_rank(s, 1.0) == 3 and choose_rank(torch.zeros(3), 0.9) == 1


def test_energy_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"lowrank\.energy.*1\.5"):
        parse_section({"lowrank": {"energy": 1.5}}, "lowrank", LowRankParams)


def test_full_rank_factors_reproduce_the_network():
    torch.manual_seed(0)
    model = build_model(SPEC, 16).eval()
    full = {p.name: p.full_rank for p in plan_ranks(model, tiny_cfg())}
    factored = factorize(model, full)
    assert isinstance(factored.features[1].conv2, LowRankConv)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert (factored(x) - model(x)).abs().max() < 1e-5


def test_plan_factorises_only_wide_layers_that_save_parameters():
    model = build_model(SPEC, 16)
    plans = {p.name: p for p in plan_ranks(model, tiny_cfg(min_channels=16, energy=0.8))}
    assert not plans["stem.0"].factorised and "min_channels 16" in plans["stem.0"].reason
    assert plans["features.1.conv2"].factorised
    p = plans["features.1.conv2"]
    assert p.params_after == p.rank * (16 + 144) < p.params_before == 16 * 144
    saving = {p.name: p for p in plan_ranks(model, tiny_cfg(energy=1.0))}
    assert not any(p.factorised for p in saving.values())
    assert "saves nothing" in saving["features.1.conv2"].reason


@pytest.fixture(scope="module")
def factorised_twice(teacher, tmp_path_factory):
    teacher_dir, prepared = teacher
    check = load_split(prepared, "val")["images"]
    out = tmp_path_factory.mktemp("lowrank_out")
    results = []
    for name in ("a", "b"):
        result = lowrank_teacher(teacher_dir, prepared, tiny_cfg())
        write_compressed(out / name, result, check)
        results.append(result)
    return results, out


def test_lowrank_model_is_smaller_and_its_record_says_how(teacher, factorised_twice):
    (result, _), out = factorised_twice
    teacher_model = load_model(teacher[0])
    assert count_params(result.model) < count_params(teacher_model)
    assert count_macs(result.model, 16) < count_macs(teacher_model, 16)
    rec = json.loads((out / "a" / RECORD).read_text())
    assert rec["ranks"] == result.spec.ranks and rec["ranks"]
    assert rec["lowrank"]["params"] == count_params(result.model) and rec["params_removed"] > 0
    assert {layer["name"] for layer in rec["layers"]} >= set(rec["ranks"])
    assert len(rec["history"]) == 1 and "val_before_finetune" in rec["lowrank"]
    convs = lambda p: sum(n.op_type == "Conv" for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert convs(out / "a" / FILES.onnx) > convs(teacher[0] / FILES.onnx)  # the factor pairs survive export


def test_lowrank_folder_rebuilds_by_code_with_identical_outputs(teacher, factorised_twice):
    (result, _), out = factorised_twice
    arch = json.loads((out / "a" / FILES.arch).read_text())
    assert arch["spec"]["ranks"] == result.spec.ranks
    assert json.loads((out / "a" / FILES.summary).read_text())["onnx_check"]["passed"] is True
    rebuilt = load_model(out / "a")
    x = to_tensor(load_split(teacher[1], "val")["images"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model.eval()(x))


def test_two_factorisations_give_byte_identical_files(factorised_twice):
    _, out = factorised_twice
    for name in (FILES.onnx, FILES.weights, FILES.arch, RECORD):
        assert (out / "a" / name).read_bytes() == (out / "b" / name).read_bytes(), name


def test_nothing_to_factorise_is_an_error_naming_the_keys(teacher):
    with pytest.raises(LatheError, match="lower lowrank.energy or lowrank.min_channels"):
        lowrank_teacher(teacher[0], teacher[1], tiny_cfg(energy=1.0))


def test_a_factorised_model_is_not_factorised_again():
    model = build_model(SPEC.model_copy(update={"ranks": {"head": 1}}), 16)
    data = {"images": np.zeros((4, 16, 16), np.uint8), "labels": np.arange(4)}
    with pytest.raises(LatheError, match="already factorised"):
        lowrank(model, data, data, tiny_cfg(), make_deterministic(0, 1), TASK)


def test_missing_teacher_and_bad_ranks_are_named(teacher, tmp_path):
    with pytest.raises(LatheError, match="teacher folder not found"):
        lowrank_teacher(tmp_path / "nope", teacher[1], tiny_cfg())
    doc = json.loads((teacher[0] / FILES.arch).read_text())
    doc["spec"]["ranks"] = {"features.0.conv7": 2}
    (tmp_path / FILES.arch).write_text(json.dumps(doc))
    (tmp_path / FILES.weights).write_bytes((teacher[0] / FILES.weights).read_bytes())
    with pytest.raises(LatheError, match="no conv/linear layer named 'features.0.conv7'"):
        load_model(tmp_path)
