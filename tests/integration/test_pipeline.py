"""End to end in a real git + DVC repo on generated raw data: reruns, params and bad inputs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lathe.measure.reports import read_report
from tests.tiny import sh

pytestmark = pytest.mark.slow

FLOAT_VARIANTS = ["teacher", "pruned", "student", "student_control", "lowrank"]
VARIANTS = FLOAT_VARIANTS + [f"quantized/{v}" for v in FLOAT_VARIANTS] + ["qat/student"]
EVALUATES = [f"evaluate@{v}" for v in VARIANTS]
STAGES = (["ingest", "validate", "train_teacher", "prune", "prune_baseline", "lowrank", "distill", "distill_control"]
          + [f"quantize@{v}" for v in FLOAT_VARIANTS] + ["qat"] + EVALUATES + ["compare", "plot_training", "package@tiny-gw"])
PACKAGE = "models/packages/tiny-gw"


def ran_stages(output: str) -> list[str]:
    """Stage names DVC reports as run ("Running stage 'x':")."""
    return re.findall(r"Running stage '([^']+)'", output)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def commit_run(ws: Path) -> None:
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-q", "-m", "pipeline run")


@pytest.fixture(scope="module")
def built(tiny_reference) -> Path:
    """A tiny workspace after one full `dvc repro` (the session's shared one: read only)."""
    ran = tiny_reference["ran"]
    assert sorted(ran) == sorted(STAGES), tiny_reference["stdout"]
    assert ran.index("train_teacher") < ran.index("distill") < ran.index("quantize@student") < ran.index("compare")
    assert ran.index("distill") < ran.index("qat") < ran.index("evaluate@qat/student")
    return tiny_reference["ws"]


@pytest.fixture()
def ws(built, tmp_path) -> Path:
    """A private copy of the built workspace (git history and DVC cache included)."""
    dest = tmp_path / "repo"
    shutil.copytree(built, dest, symlinks=True)
    return dest


def test_pipeline_produces_every_declared_output(built):
    for path in ["data/prepared/manifest.csv", "data/validation/result.json", "models/teacher/model.onnx",
                 "reports/teacher/metrics.json", "reports/teacher/detail.json", "reports/teacher/confusion.png",
                 "reports/training/teacher.csv", "reports/training/teacher.png",
                 "models/pruned/prune.json", "models/student/distill.json", "models/student_control/distill.json",
                 "models/lowrank/lowrank.json", "models/quantized/student/quantize.json", "models/qat/student/qat.json",
                 "models/baselines/pruned_50/prune.json", "reports/compare.md", "reports/compare.json",
                 "reports/pareto.png", f"{PACKAGE}/manifest.json", f"{PACKAGE}/signature", f"{PACKAGE}.tar.gz",
                 f"{PACKAGE}.tar.gz.sha256"]:
        assert (built / path).is_file(), path
    for variant in VARIANTS:
        assert (built / "reports" / variant / "metrics.json").is_file(), variant
    metrics = yaml.safe_load((built / "reports/teacher/metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and "defective_recall" in metrics and "balanced_accuracy" in metrics
    assert not (built / "reports/teacher/confusion.csv").exists()  # predictions.csv holds label and prediction


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n (sound at small n, unlike the normal one)."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_interval_matches_published_values():
    lo, hi = wilson_interval(8, 10)  # the textbook Wilson interval of 8/10: 0.490-0.943
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert abs(wilson_interval(0, 20)[0]) < 1e-12 and round(wilson_interval(0, 20)[1], 4) == 0.1611


def test_the_tiny_teacher_learns_the_generated_classes_well_above_chance(built):
    """lathe.data.generate_raw's classes are learnable: on the tiny pipeline's test split the teacher's
    4-class accuracy has a 95% interval wholly above the best a constant guess could do (the majority class)."""
    rows = list(csv.DictReader((built / "reports/teacher/predictions.csv").open()))
    labels = [int(r["label"]) for r in rows]
    correct = sum(int(r["label"]) == int(r["predicted"]) for r in rows)
    n = len(rows)
    chance = max(labels.count(k) for k in set(labels)) / n  # 0.25 here: ingest stratifies balanced classes
    lo, hi = wilson_interval(correct, n)
    metrics = read_report(built / "reports/teacher")

    assert n >= 20 and len(set(labels)) == 4
    assert metrics["n_test"] == n and abs(metrics["accuracy"] - correct / n) < 1e-6
    assert lo > chance + 0.1, f"teacher {correct}/{n} = {correct / n:.3f}, 95% CI [{lo:.3f}, {hi:.3f}], chance {chance}"


def machine_paths(ws: Path) -> tuple[list[str], list[str]]:
    """Absolute paths of this machine an artifact must not hold: (specific ones: the build folder, the
    source checkout, the virtualenv; short prefixes: the temp folder and home)."""
    import sys
    import tempfile

    from tests.tiny import ROOT

    specific = {str(ws), str(ws.resolve()), str(ROOT), sys.prefix}
    short = {tempfile.gettempdir(), str(Path.home())} - {"", "/"}
    return sorted(p.rstrip("/") + "/" for p in specific), sorted(p.rstrip("/") + "/" for p in short)


def test_no_artifact_or_manifest_holds_an_absolute_path_of_the_build_machine(built):
    text = [p for pattern in ("models/**/*.json", "models/**/*.csv", "reports/**/*.json", "reports/**/*.csv",
                              "reports/**/*.md", "data/validation/**/*", "data/prepared/*.csv",
                              "models/packages/*/model_card.md") for p in built.glob(pattern) if p.is_file()]
    binary = [p for pattern in ("models/**/*.onnx", "models/**/*.npz", "models/**/*.safetensors", "reports/**/*.png")
              for p in built.glob(pattern) if p.is_file()]
    specific, short = machine_paths(built)
    found = []
    for p in text:  # any of them where a path starts: after a quote, space, '=', '(' or '`' (".dvc/tmp/" is fine)
        for n in specific + short:
            found += [f"{p.relative_to(built)}: {m.group(0)[:100]}" for m in
                      re.finditer(rb"(?:^|(?<=[\s\"'=(`]))" + re.escape(n.encode()) + rb"\S*", p.read_bytes(), re.MULTILINE)]
    for p in binary:  # protobuf and zip strings have no delimiters: the specific paths anywhere
        found += [f"{p.relative_to(built)}: holds {n}" for n in specific if n.encode() in p.read_bytes()]

    assert {"manifest.json", "model_card.md", "metrics.json", "train.json", "quantize.json"} <= {p.name for p in text}
    assert len(text) >= 50 and len(binary) >= 10 and str(built).startswith(tuple(short))  # tmp prefix scanned
    assert not found, "\n".join(sorted(set(found)))


def test_second_repro_runs_no_stage(ws):
    res = sh(ws, "dvc", "repro")
    assert ran_stages(res.stdout) == [], res.stdout
    assert "up to date" in sh(ws, "dvc", "status").stdout


def test_evaluate_only_param_reruns_only_evaluate(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"]["latency_runs"] = 7
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_run(ws)  # the package stage refuses to package an uncommitted params change
    models_before = tree_digest(ws / "models")
    res = sh(ws, "dvc", "repro")
    # evaluate reruns for every variant; compare and package follow because the timings moved
    assert sorted(ran_stages(res.stdout)) == sorted(EVALUATES + ["compare", "package@tiny-gw"]), res.stdout
    # every trained or quantized model is untouched; the package records the new measurements
    unpackaged = lambda digest: {k: v for k, v in digest.items() if not k.startswith("packages/")}  # noqa: E731
    assert unpackaged(tree_digest(ws / "models")) == unpackaged(models_before)


def corrupt_image(raw: Path, victim: str) -> None:
    (raw / victim).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def remove_image(raw: Path, victim: str) -> None:
    (raw / victim).unlink()


def duplicate_image(raw: Path, victim: str) -> None:
    twin = sorted((raw / "images").iterdir())[-1]
    shutil.copyfile(raw / victim, twin)


def blank_image(raw: Path, victim: str) -> None:
    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, format="PNG")
    (raw / victim).write_bytes(buf.getvalue())


def relabel(value: str, column: int):
    def edit(raw: Path, victim: str) -> None:
        lines = (raw / "labels.csv").read_text().splitlines()
        for i, line in enumerate(lines):
            cells = line.split(",")
            if cells[0] == victim:
                cells[column] = value
                lines[i] = ",".join(cells)
        (raw / "labels.csv").write_text("\n".join(lines) + "\n")

    return edit


BAD_INPUTS = {
    "unreadable image": corrupt_image,
    "missing file": remove_image,
    "duplicate image": duplicate_image,
    "blank image": blank_image,
    "label outside the classes": relabel("cracked", 1),
    "empty label": relabel("", 1),
    "empty stratify value": relabel("", 3),  # cell_type, which data.stratify uses
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_stops_the_pipeline_naming_the_file_and_keeps_models(ws, kind):
    victim = (ws / "data/raw/labels.csv").read_text().splitlines()[5].split(",")[0]
    models_before = tree_digest(ws / "models")
    BAD_INPUTS[kind](ws / "data/raw", victim)
    sh(ws, "dvc", "add", "-q", "data/raw")
    res = sh(ws, "dvc", "repro", check=False)
    assert res.returncode != 0, f"{kind}: pipeline did not stop\n{res.stdout}"
    assert Path(victim).name in res.stderr + res.stdout, f"{kind}: message does not name {victim}\n{res.stderr}"
    assert "train_teacher" not in ran_stages(res.stdout)
    assert tree_digest(ws / "models") == models_before


def test_the_tiny_pipeline_reproduces_the_committed_digest_on_this_machine(tiny_reference):
    """Every data/ and models/ byte of the tiny pipeline equals tests/tiny_digest.json, whichever CPU
    made that file and whichever runs this (README "Determinism"; rewrite it with
    `python scripts/tiny_digest.py --write` only after a deliberate change)."""
    from scripts.tiny_digest import COMMITTED, differences, document

    expected = json.loads(COMMITTED.read_text())
    got = document(tiny_reference["digest"])
    diffs = differences(expected["files"], got["files"])

    assert len(got["files"]) >= 40 and any(k.startswith("models/quantized/") for k in got["files"])
    assert not diffs, (f"made on {expected['made_on']['cpu']}, rebuilt here on {got['made_on']['cpu']}: "
                       f"{len(diffs)} of {len(expected['files'])} files differ:\n" + "\n".join(diffs))


def test_trace_names_the_raw_data_md5_that_data_raw_dvc_holds(ws):
    commit_run(ws)
    raw_md5 = yaml.safe_load((ws / "data/raw.dvc").read_text())["outs"][0]["md5"]

    res = sh(ws, "lathe", "trace", PACKAGE)
    traced = json.loads(sh(ws, "lathe", "trace", f"{PACKAGE}/model.onnx", "--json").stdout)

    assert raw_md5 in res.stdout
    assert json.dumps(traced).count(raw_md5) >= 1
    assert "MISMATCH" not in res.stdout


def test_verify_rebuild_reproduces_the_package_byte_for_byte(ws):
    commit_run(ws)

    res = sh(ws, "lathe", "verify", PACKAGE, "--rebuild", check=False)

    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout


def test_lathe_gates_judges_every_variant_as_the_package_stage_does_without_building(built, tmp_path):
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"targets": {"line": {"defective_recall_target": 0.95, "gates": {
        "min_accuracy": 0.99, "max_false_reject_rate": 0.0}}}}))
    before = tree_digest(built / "models")

    res = sh(built, "lathe", "gates", "--profile", str(strict), "--out", str(tmp_path / "gates.md"), check=False)
    default = sh(built, "lathe", "gates", check=False)

    assert res.returncode == 1, res.stdout + res.stderr
    assert "line: FAIL - no variant passes every gate (latency apart); closest " in res.stdout and "misses min_accuracy" in res.stdout
    assert all(f"| {v} |" in res.stdout for v in VARIANTS)
    assert (tmp_path / "gates.md").read_text().strip() == res.stdout.strip()
    chosen = json.loads((built / PACKAGE / "manifest.json").read_text())["variant"]
    assert default.returncode == 0 and "tiny-gw: PASS" in default.stdout, default.stdout + default.stderr
    assert f"policy smallest chooses {chosen}" in default.stdout  # the package stage's choice
    assert tree_digest(built / "models") == before


def test_a_gate_no_variant_meets_fails_the_package_stage_and_keeps_the_last_package(ws):
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["targets"]["tiny-gw"]["gates"]["max_size_bytes"] = 10  # no model is 10 bytes
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_run(ws)
    before = tree_digest(ws / "models/packages")

    res = sh(ws, "dvc", "repro", check=False)

    assert res.returncode != 0
    assert "max_size_bytes" in res.stderr + res.stdout and "quantized/student" in res.stderr + res.stdout
    assert tree_digest(ws / "models/packages") == before
