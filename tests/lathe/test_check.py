"""lathe/check.py on a real repo layout (dvc.yaml, params.yaml, generated raw data), in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lathe.check import check_repo, did_you_mean, ingest_raw_dir
from lathe.data.raw import generate_raw
from tests.tiny import ROOT, tiny_params

KEY = ".lathe/keys/signing-key.pem"


def make_repo(root: Path, params: dict) -> Path:
    """dvc.yaml of the project, `params`, 48 generated samples in data/raw and a key file (not a git repo)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_raw(root / "data" / "raw", per_class_type=6, size=32)
    (root / KEY).parent.mkdir(parents=True)
    (root / KEY).write_text("-----BEGIN PRIVATE KEY-----\n")  # presence is what the check can see
    return root


def problems_of(root: Path) -> list[str]:
    return [str(p) for p in check_repo(root).problems]


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", tiny_params())


def test_the_tiny_config_and_data_pass_with_the_exact_splits(repo):
    report = check_repo(repo)
    assert report.ok, report.problems
    assert report.warnings == []
    # 8 strata of 6: 2 test, 1 val, 3 train each (lathe.data.ingest.stratified_split), as ingest will make them
    assert any("data/raw: 48 samples -> train 24, val 8, test 16" in f for f in report.facts), report.facts
    assert report.summary().startswith("OK: params.yaml")


def test_the_predicted_splits_are_the_ones_ingest_makes(repo):
    from collections import Counter

    from lathe.data.contract import DataParams
    from lathe.data.ingest import ingest
    from lathe.data.params import IngestParams

    rows, _, _ = ingest(repo / "data/raw", IngestParams(**tiny_params()["ingest"]), DataParams(**tiny_params()["data"]))
    made = Counter(r.split for r in rows)
    fact = f"data/raw: {len(rows)} samples -> train {made['train']}, val {made['val']}, test {made['test']}"
    assert fact in check_repo(repo).facts


def test_the_ingest_stage_of_dvc_yaml_names_the_raw_folder(repo, tmp_path):
    assert ingest_raw_dir(repo) == Path("data/raw")
    assert ingest_raw_dir(tmp_path) is None  # no dvc.yaml
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"cmd": "echo a"}}}))
    assert ingest_raw_dir(tmp_path) is None


# (params change, the problem's key, a text the message must hold)
MISTAKES = {
    "unknown section": ({"quantise": {"calibration_size": 8}}, "params.yaml: quantise", "did you mean 'quantize'"),
    "unknown key": ({"prune": {"ration": 0.5}}, "params.yaml: prune.ration", "did you mean 'ratio'"),
    "out of range": ({"prune": {"ratio": 1.5}}, "params.yaml: prune.ratio", "less than 1"),
    "literal typo": ({"quantize": {"method": "minmx"}}, "params.yaml: quantize.method", "did you mean 'minmax'"),
    "calibration": ({"quantize": {"calibration_size": 256}}, "params.yaml: quantize.calibration_size",
                    "train split ingest will make (24 samples); lower it to at most 24"),
    "per class": ({"validate": {"min_per_class_per_split": 3}}, "params.yaml: validate.min_per_class_per_split",
                  "val/functional: 2"),
    "variant": ({"package": {"variants": ["quantized/studnet"]}}, "params.yaml: package.variants[0]",
                "did you mean 'quantized/student'"),
    "key": ({"package": {"private_key": "keys/none.pem"}}, "params.yaml: package.private_key", "lathe keys init"),
    "num_classes": ({"train_teacher": {"arch": {"num_classes": 3}}}, "params.yaml: train_teacher.arch.num_classes",
                    "3, but the data has 4 (data.classes)"),
    "gate typo": ({"targets": {"tiny-gw": {"gates": {"max_sise_bytes": 1}}}},
                  "params.yaml: targets.tiny-gw.gates.max_sise_bytes", "did you mean 'max_size_bytes'"),
    "target name": ({"targets": {"Line PC": {}}}, "params.yaml: targets.Line PC", "must match"),
    "defective class": ({"data": {"defective": ["defectve"]}}, "params.yaml: data",
                        "defective names ['defectve'], not in classes"),
    "cross-field": ({"ingest": {"val_fraction": 0.45, "test_fraction": 0.45}}, "params.yaml: ingest",
                    "leaves less than 20% for training"),
    "min rows": ({"validate": {"min_rows": 100}}, "params.yaml: validate.min_rows", "the data has 48 rows"),
    "not a number": ({"ingest": {"val_fraction": float("nan")}}, "params.yaml: ingest.val_fraction", "finite number"),
    "overflow": ({"prune": {"ratio": float("inf")}}, "params.yaml: prune.ratio", "finite number"),
    "channels": ({"data": {"channels": 2}}, "params.yaml: data.channels", "2 is not one of 1, 3"),
    "class name": ({"data": {"classes": ["ok", "bad/worse"], "defective": ["bad/worse"]}}, "params.yaml: data",
                   "must be 1-100 letters"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_each_mistake_is_one_line_naming_its_key(tmp_path, name):
    change, key, text = MISTAKES[name]
    params = tiny_params()
    for section, values in change.items():
        if section == "targets":
            params["targets"] = values
        else:
            params.setdefault(section, {}).update(values)
    found = problems_of(make_repo(tmp_path / "repo", params))
    hits = [p for p in found if p.startswith(key + ":")]
    assert hits and any(text in p for p in hits), found
    assert all("\n" not in p for p in found)


def test_every_mistake_at_once_and_every_bad_row(tmp_path):
    params = tiny_params()
    for change, _, _ in MISTAKES.values():
        for section, values in change.items():
            # one targets mapping; ingest's would hide the splits, and the data rows below are judged
            # against a valid data section
            if section not in ("targets", "ingest", "data"):
                params.setdefault(section, {}).update(values)
    repo = make_repo(tmp_path / "repo", params)
    labels = repo / "data/raw/labels.csv"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",scrap,0.5,mono"
    lines[3] = lines[3].split(",")[0] + ",functional,0,"
    (repo / "data/raw" / lines[4].split(",")[0]).unlink()
    labels.write_text("\n".join(lines + [lines[5], "images/extra.png,1e308,1,mono"]) + "\n")

    found = problems_of(repo)

    keys = {p.split(": ")[1] for p in found if p.startswith("params.yaml: ")}
    assert {"quantise", "prune.ration", "prune.ratio", "quantize.method", "package.variants[0]",
            "package.private_key", "train_teacher.arch.num_classes", "validate.min_rows"} <= keys, found
    # 47 usable rows of 50: 24 train still (the calibration check runs on what ingest will keep)
    assert "quantize.calibration_size" in keys
    data = [p for p in found if p.startswith("data/raw/labels.csv:")]
    assert any(":3 (" in p and "label 'scrap' is not one of data.classes" in p for p in data), data
    assert any(":4 (" in p and "empty cell_type" in p for p in data), data
    assert any(":5 (" in p and "file not found" in p for p in data), data
    assert any(":50 (" in p and "listed again (first on line 6)" in p for p in data), data
    assert any(":51 (" in p and "label '1e308' is not one of data.classes" in p for p in data), data


def test_missing_or_broken_params_and_data_are_named(tmp_path):
    repo = make_repo(tmp_path / "repo", tiny_params())
    (repo / "params.yaml").write_text("ingest: [1\n")
    shutil.rmtree(repo / "data/raw")
    found = problems_of(repo)
    assert found[0].startswith("params.yaml: not valid YAML"), found
    assert "data/raw: raw-data folder not found (`dvc pull`, or `make data`)" in found


def test_a_labels_file_without_its_columns_is_one_line(repo):
    (repo / "data/raw/labels.csv").write_text("file,prob\nimages/x.png,0\n")
    found = problems_of(repo)
    assert found == ["data/raw/labels.csv: missing column(s) label; header is file,prob"], found


def test_a_gate_above_its_recall_target_is_a_warning_not_a_problem(tmp_path):
    params = tiny_params()
    params["targets"]["tiny-gw"]["gates"]["min_defective_recall"] = 0.9
    report = check_repo(make_repo(tmp_path / "repo", params))
    assert report.ok
    assert [w.where for w in report.warnings] == ["params.yaml: targets.tiny-gw.gates.min_defective_recall"]


def lite_teacher_params(**arch) -> dict:
    params = tiny_params()
    params["train_teacher"] = {**params["train_teacher"], "arch": {"family": "efficientnet_lite", **arch}}
    return params


def test_an_imagenet_teacher_has_its_pinned_weights_checked_and_a_pruned_student_start_named(tmp_path):
    report = check_repo(make_repo(tmp_path / "repo", lite_teacher_params()))
    assert report.ok and report.warnings == [], (report.problems, report.warnings)  # every stage takes it
    assert any(f.startswith("teacher weights efficientnet-lite0-imagenet (sha256 579344248a93") for f in report.facts)
    params = lite_teacher_params()
    params["distill"] = {**params["distill"], "init": "pruned"}
    report = check_repo(make_repo(tmp_path / "pruned-start", params))
    assert report.ok and [w.where for w in report.warnings] == ["params.yaml: distill.init"]
    assert "takes resnet_like students only" in report.warnings[0].message


@pytest.mark.parametrize(("arch", "said"), [
    ({"family": "resnet"}, "params.yaml: train_teacher.arch: family 'resnet' is not one of resnet_like, efficientnet_lite"),
    ({"family": "efficientnet_lite", "widths": [8]},
     "params.yaml: train_teacher.arch.widths: unknown key (did you mean 'weights'?); allowed: dropout, family, "
     "frozen_blocks, in_channels, memoize_frozen, num_classes, weights"),
])
def test_a_family_mistake_is_one_line_naming_the_users_key(tmp_path, arch, said):
    params = tiny_params()
    params["train_teacher"] = {**params["train_teacher"], "arch": arch}
    assert problems_of(make_repo(tmp_path / "repo", params)) == [said]


def test_an_imagenet_teacher_with_unknown_weights_is_one_line(tmp_path):
    problems = problems_of(make_repo(tmp_path / "repo", lite_teacher_params(weights="resnet50-imagenet")))
    assert problems == ["params.yaml: train_teacher.arch.weights: unknown pretrained weights 'resnet50-imagenet'; "
                        "known: efficientnet-lite0-imagenet"]


def test_did_you_mean_is_quiet_when_nothing_is_close():
    assert did_you_mean("quantise", ["quantize", "ingest"]) == " (did you mean 'quantize'?)"
    assert did_you_mean("zzz", ["quantize", "ingest"]) == ""


@pytest.mark.parametrize("params", [tiny_params(), lite_teacher_params()], ids=["resnet_like", "efficientnet_lite"])
def test_the_check_imports_no_torch_onnxruntime_or_great_expectations(tmp_path, params):
    """A fresh interpreter, as `lathe check` starts: the heavy libraries stay out, and it is quick (also
    when it hashes an ImageNet teacher's 18.8 MB weights file)."""
    repo = make_repo(tmp_path / "repo", params)
    code = (
        "import json, sys, time; from pathlib import Path; t = time.monotonic(); "
        "from lathe.check import check_repo; r = check_repo(Path(sys.argv[1])); "
        "print(json.dumps({'ok': r.ok, 'seconds': time.monotonic() - t, "
        "'heavy': sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'great_expectations', 'prefect') "
        "if m in sys.modules)}))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, cwd=ROOT, check=True)
    out = json.loads(res.stdout)
    assert out["ok"] and out["heavy"] == [], out
    assert out["seconds"] < 5, out  # ~0.5 s here; the bound leaves room for a loaded 2-core machine


def test_an_overflowing_number_in_the_yaml_text_is_named(tmp_path):
    """1.0e400 is valid YAML; it parses to inf, which no setting accepts."""
    repo = make_repo(tmp_path / "repo", tiny_params())
    text = (repo / "params.yaml").read_text().replace("ratio: 0.5", "ratio: 1.0e400", 1)
    assert "1.0e400" in text
    (repo / "params.yaml").write_text(text)
    found = problems_of(repo)
    assert any(p.startswith("params.yaml: prune.ratio:") and "finite number" in p for p in found), found
