import json

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from lathe.compress.params import PruneParams
from lathe.compress.prune import (
    RECORD,
    channel_groups,
    make_importance,
    prune,
    prune_teacher,
    prune_to_counts,
    search_counts,
)
from lathe.compress.result import write_compressed
from lathe.config import parse_section
from lathe.data.contract import Task
from lathe.data.ingest import load_split
from lathe.determinism import make_deterministic
from lathe.errors import ConfigError, DataError, LatheError
from lathe.model.arch import build_model, count_macs, count_params
from lathe.model.params import ArchSpec
from lathe.model.teacher import FILES, load_model
from lathe.model.train import to_tensor
from tests.tiny import TINY_PARAMS, make_prepared, make_teacher

TASK = Task(classes=["a", "b", "c", "d"], defective=["c", "d"], image_size=16)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained teacher folder and its prepared data: (teacher_dir, prepared_dir)."""
    root = tmp_path_factory.mktemp("prune")
    prepared = make_prepared(root)
    return make_teacher(root, prepared), prepared


def tiny_cfg(**overrides) -> PruneParams:
    return PruneParams(**{**TINY_PARAMS["prune"], **overrides})


def test_ratio_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"prune\.ratio.*less than 1.*1\.5"):
        parse_section({"prune": {"ratio": 1.5}}, "prune", PruneParams)
    with pytest.raises(ConfigError, match=r"prune\.importance"):
        parse_section({"prune": {"importance": "taylor"}}, "prune", PruneParams)


def test_importance_registry_maps_names_to_torch_pruning_objects():
    l1, l2 = make_importance("l1"), make_importance("l2")
    assert isinstance(l1, tp.importance.MagnitudeImportance) and l1.p == 1 and l2.p == 2
    assert isinstance(make_importance("random"), tp.importance.RandomImportance)
    with pytest.raises(ConfigError, match="prune.importance: unknown 'taylor'"):
        make_importance("taylor")


def test_groups_couple_residual_adds_and_leave_the_classes_alone():
    model = build_model(ArchSpec(**TINY_PARAMS["train_teacher"]["arch"]), 16)
    groups = {g.convs: g.channels for g in channel_groups(model)}
    # identity shortcut: the stem's channels are block 0's output channels
    assert groups == {("features.0.conv2", "stem.0"): 8, ("features.0.conv1",): 8,
                      ("features.1.conv2", "features.1.shortcut.0"): 16, ("features.1.conv1",): 16}


def test_l1_importance_keeps_the_largest_filter():
    torch.manual_seed(0)
    model = build_model(ArchSpec(**TINY_PARAMS["train_teacher"]["arch"]), 16).eval()
    with torch.no_grad():
        model.features[0].conv1.weight[5] *= 100  # channel 5 of block 0's conv1 dominates its group
    counts = {g.convs: g.channels for g in channel_groups(model)} | {("features.0.conv1",): 1}
    pruned = prune_to_counts(model, counts, make_importance("l1"))
    conv1 = pruned.features[0].conv1
    assert conv1.weight.shape == (1, 8, 3, 3) and pruned.features[0].conv2.weight.shape == (8, 1, 3, 3)
    assert torch.equal(conv1.weight[0], model.features[0].conv1.weight[5])
    assert torch.equal(pruned.features[0].bn1.running_mean, model.features[0].bn1.running_mean[5:6])


def test_projection_survives_pruning_that_makes_in_and_out_widths_equal(tmp_path):
    spec = ArchSpec(stem_channels=8, stem_stride=1, widths=[16], blocks=[1])  # 8 -> 16: a projection
    model = build_model(spec, 16).eval()
    counts = {("features.0.conv2", "features.0.shortcut.0"): 8, ("stem.0",): 8, ("features.0.conv1",): 4}
    pruned = prune_to_counts(model, counts, make_importance("l1"))
    assert pruned.spec.projection == [True] and pruned.spec.widths == [8] and pruned.spec.stem_channels == 8
    assert isinstance(pruned.features[0].shortcut, nn.Sequential)
    x = torch.rand(3, 1, 16, 16)
    rebuilt = build_model(ArchSpec.model_validate(json.loads(json.dumps(pruned.spec.model_dump()))), 16)
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned(x))


def test_mac_search_lands_within_one_percent_on_the_default_teacher():
    model = build_model(ArchSpec(), 64).eval()
    groups = channel_groups(model)
    initial = {g.convs: g.channels for g in groups}
    macs = count_macs(model, 64)
    for ratio in (0.3, 0.5, 0.8):
        counts = search_counts(model, groups, initial, (1 - ratio) * macs, round_to=1)
        pruned = prune_to_counts(model, counts, make_importance("l1"))
        assert abs(count_macs(pruned, 64) / ((1 - ratio) * macs) - 1) < 0.01


def test_round_to_keeps_multiples():
    model = build_model(ArchSpec(), 64).eval()
    groups = channel_groups(model)
    initial = {g.convs: g.channels for g in groups}
    counts = search_counts(model, groups, initial, 0.5 * count_macs(model, 64), round_to=8)
    assert all(c % 8 == 0 and c >= 8 for c in counts.values())


@pytest.fixture(scope="module")
def pruned_twice(teacher, tmp_path_factory):
    """Two full prunes (MACs target, 2 rounds) of the same teacher, each written to a folder."""
    teacher_dir, prepared = teacher
    check = load_split(prepared, "val")["images"]
    out = tmp_path_factory.mktemp("pruned")
    results = []
    for name in ("a", "b"):
        result = prune_teacher(teacher_dir, prepared, tiny_cfg())
        write_compressed(out / name, result, check)
        results.append(result)
    return results, out


def test_mac_target_lands_close_and_the_model_is_physically_smaller(teacher, pruned_twice):
    (result, _), out = pruned_twice
    teacher_model = load_model(teacher[0])
    teacher_macs = count_macs(teacher_model, 16)
    macs = count_macs(result.model, 16)
    assert abs(macs / (0.5 * teacher_macs) - 1) < 0.05  # tiny layers: one channel is several % of MACs
    assert count_params(result.model) < count_params(teacher_model)
    assert result.spec.widths[-1] < 16 and result.model.head.in_features == result.spec.widths[-1]
    rec = json.loads((out / "a" / RECORD).read_text())
    assert rec["teacher"]["macs"] == teacher_macs and rec["pruned"]["macs"] == macs
    assert [r["round"] for r in rec["rounds"]] == [1, 2] and rec["rounds"][0]["macs"] > rec["rounds"][1]["macs"]
    assert rec["rounds"][0]["target_macs"] == round(0.75 * teacher_macs)
    assert rec["importance"] == "l1" and len(rec["history"]) == 2 and rec["history"][1]["round"] == 2


def test_pruned_folder_rebuilds_from_json_and_safetensors_with_identical_outputs(teacher, pruned_twice):
    (result, _), out = pruned_twice
    files = {p.name for p in (out / "a").iterdir()}
    assert files == {FILES.weights, FILES.arch, FILES.onnx, FILES.summary, RECORD}
    summary = json.loads((out / "a" / FILES.summary).read_text())
    assert summary["onnx_check"] == {"max_abs_diff_limit": 1e-4, "passed": True} and summary["epochs_run"] == 2
    rebuilt = load_model(out / "a")
    x = to_tensor(load_split(teacher[1], "val")["images"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model.eval()(x))


def test_two_prunes_give_byte_identical_files(pruned_twice):
    _, out = pruned_twice
    for name in (FILES.onnx, FILES.weights, FILES.arch, RECORD):
        assert (out / "a" / name).read_bytes() == (out / "b" / name).read_bytes(), name


def test_channel_target_removes_that_share_of_channels(teacher):
    teacher_dir, prepared = teacher
    result = prune_teacher(teacher_dir, prepared, tiny_cfg(target="channels", ratio=0.5, steps=1, importance="random"))
    assert result.record["channels_removed"] == 0.5
    assert result.spec.stem_channels == 4 and result.spec.widths == [4, 8] and result.spec.mid_channels == [4, 8]


def test_ratio_that_would_empty_a_layer_is_refused(teacher):
    teacher_dir, prepared = teacher
    with pytest.raises(ConfigError, match=r"prune.ratio = 0.95 would remove every channel of layer 'stem.0'"):
        prune_teacher(teacher_dir, prepared, tiny_cfg(target="channels", ratio=0.95))
    with pytest.raises(ConfigError, match=r"prune.ratio = 0.99 \(target macs\).*must stay below"):
        prune_teacher(teacher_dir, prepared, tiny_cfg(ratio=0.99))


def test_missing_or_broken_teacher_files_are_named(teacher, tmp_path):
    teacher_dir, prepared = teacher
    with pytest.raises(LatheError, match="teacher folder not found"):
        prune_teacher(tmp_path / "nope", prepared, tiny_cfg())
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(LatheError, match=r"arch\.json: teacher file missing"):
        prune_teacher(broken, prepared, tiny_cfg())
    (broken / FILES.arch).write_text("{not json")
    with pytest.raises(LatheError, match=r"arch\.json: teacher architecture is not valid JSON"):
        prune_teacher(broken, prepared, tiny_cfg())
    (broken / FILES.arch).write_text(json.dumps({"image_size": 16, "spec": {"widths": [8], "blocks": [1, 1]}}))
    with pytest.raises(LatheError, match=r"arch\.json: invalid 'spec'.*equal length"):
        prune_teacher(broken, prepared, tiny_cfg())
    (broken / FILES.arch).write_text((teacher_dir / FILES.arch).read_text())
    with pytest.raises(LatheError, match=r"weights\.safetensors"):
        prune_teacher(broken, prepared, tiny_cfg())
    (broken / FILES.weights).write_bytes(b"garbage")
    with pytest.raises(LatheError, match=r"weights\.safetensors: unreadable"):
        prune_teacher(broken, prepared, tiny_cfg())


def test_images_of_another_size_are_refused(teacher, tmp_path):
    prepared24 = make_prepared(tmp_path, {**TINY_PARAMS["ingest"], "image_size": 24})
    with pytest.raises(DataError, match=r"train.safetensors: images are 24 px but .* built for 16 px"):
        prune_teacher(teacher[0], prepared24, tiny_cfg())


def test_a_factorised_model_is_not_pruned():
    spec = ArchSpec(**{**TINY_PARAMS["train_teacher"]["arch"], "ranks": {"head": 1}})
    data = {"images": np.zeros((4, 16, 16), np.uint8), "labels": np.arange(4)}
    with pytest.raises(LatheError, match="low-rank factorised"):
        prune(build_model(spec, 16), data, data, tiny_cfg(), make_deterministic(0, 1), TASK)
