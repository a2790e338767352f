import json
import subprocess
import sys

import pytest
import yaml

from stages import compare as stage
from tests.lathe.measure.test_compare import METRICS, write_metrics
from tests.tiny import ROOT, offline_env, tiny_params

VARIANTS = ["teacher", "pruned", "student", "quantized/student"]


def run(tmp_path, *extra, params=None):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params or tiny_params()))
    stage.main([str(tmp_path / "reports"), *extra, "--params", str(path)])
    return tmp_path / "reports"


def test_stage_writes_json_markdown_and_png(tmp_path):
    write_metrics(tmp_path / "reports")
    out = run(tmp_path, *VARIANTS)
    data = json.loads((out / "compare.json").read_text())
    assert data["reference"] == "teacher" and data["order"] == VARIANTS
    assert set(data["variants"]) == set(VARIANTS)
    assert data["variants"]["quantized/student"]["size_ratio"] == round(4_950_000 / 173_000, 4)
    md = (out / "compare.md").read_text()
    assert md.startswith("# Variant comparison") and "quantized/student ★" in md
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    # only the three declared outputs are added next to the variant folders
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compare.json", "compare.md", "pareto.png", "teacher", "pruned", "student", "quantized"])


def test_rerun_gives_byte_identical_outputs(tmp_path):
    write_metrics(tmp_path / "reports")
    out = run(tmp_path, *VARIANTS)
    first = {n: (out / n).read_bytes() for n in ("compare.json", "compare.md", "pareto.png")}
    run(tmp_path, *VARIANTS)
    assert first == {n: (out / n).read_bytes() for n in first}


def test_reference_option_and_dvc_reads_the_numbers(tmp_path):
    write_metrics(tmp_path / "reports")
    out = run(tmp_path, *VARIANTS, "--reference", "student")
    data = json.loads((out / "compare.json").read_text())
    assert data["reference"] == "student" and data["variants"]["student"]["size_ratio"] == 1.0
    assert data["variants"]["teacher"]["accuracy"] == METRICS["teacher"]["accuracy"]


def test_missing_metrics_exits_1_naming_the_file_and_writes_nothing(tmp_path, capsys):
    write_metrics(tmp_path / "reports", {"teacher": METRICS["teacher"]})
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "teacher", "lowrank")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "[compare] FAILED" in err and "reports/lowrank: report of variant 'lowrank' not found" in err
    assert not any((tmp_path / "reports" / n).exists() for n in ("compare.json", "compare.md", "pareto.png"))


def test_params_typo_exits_1_naming_the_key(tmp_path, capsys):
    write_metrics(tmp_path / "reports")
    with pytest.raises(SystemExit):
        run(tmp_path, *VARIANTS, params=tiny_params(compare={"pareto_metrc": "accuracy"}))
    assert "compare.pareto_metrc" in capsys.readouterr().err


def test_runs_as_a_module_like_dvc_does_and_the_png_is_stable_across_processes(tmp_path):
    write_metrics(tmp_path / "reports", {"teacher": METRICS["teacher"], "pruned": METRICS["pruned"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    env = offline_env()
    env["PYTHONPATH"] = str(ROOT)
    pngs = []
    for hash_seed in ("1", "2"):  # a fresh interpreter each time, different str hashing
        env["PYTHONHASHSEED"] = hash_seed
        res = subprocess.run([sys.executable, "-m", "stages.compare", "reports", "teacher", "pruned"], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "[compare]" in res.stderr
        pngs.append((tmp_path / "reports" / "pareto.png").read_bytes())
    assert pngs[0] == pngs[1]
    assert (tmp_path / "reports" / "compare.md").is_file()
