"""The installed `lathe check` in a real git + DVC repo (tests/tiny.make_workspace): every mistake at once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import BIN, make_workspace, offline_env, tiny_params

# ten different mistakes: (params change, the key the output must name, a text its line must hold)
TEN = [
    ({"quantise": {"method": "minmax"}}, "quantise", "did you mean 'quantize'"),
    ({"targets": {"tiny-gw": {"gates": {"max_sise_bytes": 400000}}}}, "targets.tiny-gw.gates.max_sise_bytes",
     "did you mean 'max_size_bytes'"),
    ({"quantize": {"calibration_size": 256}}, "quantize.calibration_size", "at most 56"),
    ({"prune": {"ratio": 1.5}}, "prune.ratio", "less than 1"),
    ({"quantize": {"method": "minmx"}}, "quantize.method", "did you mean 'minmax'"),
    ({"package": {"variants": ["quantized/studnet"]}}, "package.variants[0]", "did you mean 'quantized/student'"),
    ({"validate": {"min_per_class_per_split": 5}}, "validate.min_per_class_per_split", "val/functional: 4"),
    ({"package": {"private_key": ".lathe/keys/gone.pem"}}, "package.private_key", "not found"),
    ({"data": {"channels": 2}}, "data.channels", "2 is not one of 1, 3"),
    ({"ops": {"retires": 2}}, "ops.retires", "did you mean 'retries'"),
]


def lathe_check(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The venv's console script, as a user runs it; (result, wall seconds)."""
    start = time.monotonic()
    res = subprocess.run([str(BIN / "lathe"), "check", *args], cwd=cwd, env=offline_env(), capture_output=True,
                         text=True, check=False)
    return res, time.monotonic() - start


def bad_params() -> dict:
    params = tiny_params()
    params["validate"]["min_per_class_per_split"] = 1
    for change, _, _ in TEN:
        for section, values in change.items():
            if section == "targets":
                params["targets"]["tiny-gw"]["gates"].update(values["tiny-gw"]["gates"])
            else:
                params.setdefault(section, {}).update(values)
    return params


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("check") / "ws", tiny_params())


def test_ten_mistakes_are_named_in_one_run_from_a_subfolder_and_nothing_runs(ws):
    good = (ws / "params.yaml").read_text()
    (ws / "params.yaml").write_text(yaml.safe_dump(bad_params(), sort_keys=False))
    (ws / "docs").mkdir(exist_ok=True)
    try:
        res, seconds = lathe_check(ws / "docs")  # default --params: the repository's params.yaml
    finally:
        (ws / "params.yaml").write_text(good)

    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    problems = [line for line in res.stdout.splitlines() if line.startswith("params.yaml: ")]
    for _, key, text in TEN:
        assert any(line.startswith(f"params.yaml: {key}:") and text in line for line in problems), (key, out)
    assert len(problems) == 10, out
    assert "10 problem(s) found" in res.stdout and "Traceback" not in out
    assert not (ws / "data" / "prepared").exists() and not (ws / "models").exists()
    assert seconds < 10, f"lathe check took {seconds:.1f} s"  # ~1.5 s here, interpreter start included


def test_bad_rows_and_params_are_named_together(ws):
    labels = ws / "data" / "raw" / "labels.csv"
    good = labels.read_text()
    lines = good.splitlines()
    victim = lines[3].split(",")[0]
    lines[1] = lines[1].split(",")[0] + ",defectve,1.0,mono"
    lines[2] = lines[2].split(",")[0] + ",defective,1.0,"
    lines[3] = "images/gone.png,functional,0.0,mono"
    lines.append(lines[4])
    labels.write_text("\n".join(lines) + "\n")
    params = tiny_params(quantize={"calibration_size": 60})
    (ws / "check-params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        res, _ = lathe_check(ws, "--params", "check-params.yaml")
    finally:
        labels.write_text(good)
        (ws / "check-params.yaml").unlink()

    found = res.stdout.splitlines()
    assert res.returncode == 1
    assert any(f.startswith("data/raw/labels.csv:2 (") and "did you mean 'defective'" in f for f in found), found
    assert any(f.startswith("data/raw/labels.csv:3 (") and "empty cell_type" in f for f in found), found
    assert any(f.startswith("data/raw/labels.csv:4 (images/gone.png): file not found") for f in found), found
    assert any(f.startswith("data/raw/labels.csv:98 (") and "listed again (first on line 5)" in f for f in found)
    # 94 usable rows of 97 make a train split of 55 (one stratum lost a sample)
    assert any(f.startswith("check-params.yaml: quantize.calibration_size: 60 is larger") for f in found), found
    assert victim  # the image of the replaced row stays on disk, unlisted: not a problem


def test_a_good_repo_says_ok_quickly(ws):
    res, seconds = lathe_check(ws)
    assert res.returncode == 0, res.stdout + res.stderr
    last = res.stdout.splitlines()[-1]
    assert last.startswith("OK: params.yaml") and "96 samples -> train 56, val 16, test 24" in last, res.stdout
    assert "signing key .lathe/keys/signing-key.pem" in last
    assert "warning" not in res.stdout  # committed tree, no gate above its target
    assert seconds < 10, f"lathe check took {seconds:.1f} s"
