"""The tiny pipeline's reports as a user meets them through DVC: `dvc plots show` offline, `dvc metrics
show`, `dvc exp show`, and a clean tree afterwards (issue 13). Real DVC on the shared tiny build."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lathe.measure.metrics import HEADLINE_KEYS
from tests.integration.test_pipeline import VARIANTS, commit_run, ran_stages
from tests.tiny import ROOT, sh

pytestmark = pytest.mark.slow

TRAINED = ["teacher", "pruned", "pruned_50", "lowrank", "student", "student_control", "qat_student"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_COLUMNS = 12  # per variant row of `dvc metrics show`, its Path column included
TERMINAL = 160


def static_name(rel: str) -> str:
    """How `dvc plots show` names a workspace image under dvc_plots/static/."""
    return "workspace_" + rel.replace("/", "_")


def readme_command(name: str) -> list[str]:
    """The `dvc ...` command on the README line that ends with the comment `# <name>`, as argv."""
    import shlex

    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("dvc ") and line.rstrip().endswith(f"# {name}"):
            return shlex.split(line.split(" # ", 1)[0])
    raise AssertionError(f"README.md has no `dvc ...  # {name}` line")


@pytest.fixture(scope="module")
def built(tiny_reference) -> Path:
    return tiny_reference["ws"]


@pytest.fixture()
def ws(built, tmp_path) -> Path:
    dest = tmp_path / "repo"
    shutil.copytree(built, dest, symlinks=True)
    return dest


def test_dvc_plots_show_offline_gives_an_image_per_training_curve_confusion_matrix_and_the_pareto_front(ws):
    """DVC copies image plots into dvc_plots/static/ and links them from index.html: nothing to fetch."""
    res = sh(ws, "dvc", "plots", "show")

    out = ws / "dvc_plots"
    wanted = ([f"reports/training/{v}.png" for v in TRAINED] + [f"reports/{v}/confusion.png" for v in VARIANTS]
              + [f"reports/{v}/pr_curve.png" for v in VARIANTS] + ["reports/pareto.png"])
    static = sorted(p.name for p in (out / "static").iterdir())
    assert static == sorted(static_name(p) for p in wanted), res.stdout
    for rel in wanted:  # DVC's copies are the stages' pictures, byte for byte, and real PNGs
        copy = (out / "static" / static_name(rel)).read_bytes()
        assert copy.startswith(PNG_MAGIC) and copy == (ws / rel).read_bytes(), rel
    html = (out / "index.html").read_text()
    assert sorted(re.findall(r'<img src="static/([^"]+)"', html)) == static
    assert not re.search(r"https?://", html)  # no vega, no CDN: every plot is an image
    assert "vega" not in html.lower()


def test_dvc_metrics_show_has_a_handful_of_headline_columns_per_variant(built):
    shown = json.loads(sh(built, "dvc", "metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    assert sorted(files) == sorted(f"reports/{v}/metrics.json" for v in VARIANTS)  # compare.json is not one
    for path, entry in files.items():
        assert sorted(entry["data"]) == sorted(HEADLINE_KEYS), path
    table = sh(built, "dvc", "metrics", "show").stdout.splitlines()
    header, rows = table[0].split(), [line.split() for line in table[1:] if line.strip()]
    assert header[0] == "Path" and len(header) <= MAX_COLUMNS, header
    assert len(rows) == len(VARIANTS) and all(len(r) == len(header) for r in rows), table


def test_the_readme_dvc_exp_show_command_fits_a_160_column_terminal(ws):
    """The README's `dvc exp show` line shows its headline columns whole (no column collapsed to "…")."""
    commit_run(ws)
    argv = readme_command("headline columns of one variant")
    env_cols = {"COLUMNS": str(TERMINAL), "LINES": "50"}

    res = sh(ws, "env", *(f"{k}={v}" for k, v in env_cols.items()), *argv, "--no-pager")

    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert lines and max(len(line) for line in lines) <= TERMINAL, res.stdout
    assert "…" not in res.stdout, res.stdout
    header = lines[1]
    kept = [k for k in ("accuracy", "size_bytes") if f"metrics.json:{k}" in header]
    assert kept == ["accuracy", "size_bytes"], header
    assert "workspace" in res.stdout and "master" in res.stdout


def test_after_dvc_plots_show_the_next_repro_still_packages(ws):
    """dvc_plots/ is git-ignored, so the package stage does not find a dirty tree."""
    commit_run(ws)
    sh(ws, "dvc", "plots", "show")
    assert (ws / "dvc_plots/index.html").is_file()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["evaluate"]["latency_runs"] = 6
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_run(ws)
    assert sh(ws, "git", "status", "--porcelain").stdout == ""
    before = json.loads((ws / "models/packages/tiny-gw/manifest.json").read_text())

    res = sh(ws, "dvc", "repro")

    assert "package@tiny-gw" in ran_stages(res.stdout), res.stdout
    manifest = json.loads((ws / "models/packages/tiny-gw/manifest.json").read_text())
    assert manifest["git"]["dirty"] is False and "dirty_paths" not in manifest["git"]
    assert manifest["params"]["evaluate"]["latency_runs"] == 6 != before["params"]["evaluate"]["latency_runs"]
    # the manifest says how latency was measured, and the card repeats it beside the figures
    assert manifest["metrics"]["test"]["timing_method"].startswith("evaluate stage: onnxruntime CPU, batch 1")
    card = (ws / "models/packages/tiny-gw/model_card.md").read_text()
    assert "- measured by the evaluate stage: onnxruntime CPU, batch 1, 1 thread, p50/p95 of 6 calls" in card


def test_pictures_and_detail_are_byte_stable_when_their_stages_rerun(ws):
    """The PNGs carry no timestamp or version: forced reruns give the same bytes (detail.json too)."""
    names = ([f"reports/training/{v}.png" for v in TRAINED] + ["reports/teacher/confusion.png",
                                                              "reports/teacher/detail.json"])
    before = {n: (ws / n).read_bytes() for n in names}

    sh(ws, "dvc", "repro", "--force", "--single-item", "plot_training")
    sh(ws, "dvc", "repro", "--force", "--single-item", "evaluate@teacher")

    assert {n: (ws / n).read_bytes() for n in names} == before
