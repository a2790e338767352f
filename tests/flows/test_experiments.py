"""flows/experiments.py: pure helpers on fixed inputs, then a real 2-point sweep (real `dvc exp`,
real Prefect temporary server) on a tiny workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.experiments import (
    ARTIFACT_KEY,
    REPORT_JSON,
    REPORT_MD,
    experiment_name,
    experiments_from_show,
    grid_points,
    pareto_markdown,
    pareto_table,
    set_args,
    set_value,
    sweep,
)
from tests.tiny import sh

# --- pure helpers ---------------------------------------------------------------------------------


def test_grid_points_is_the_cartesian_product_in_key_order():
    points = grid_points({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6
    assert points[0] == {"a": 1, "b": "x"} and points[-1] == {"a": 2, "b": "z"}


def test_grid_points_rejects_an_axis_without_values():
    with pytest.raises(ValueError, match="without values"):
        grid_points({"a": [1], "b": []})


def test_set_value_is_yaml_that_dvc_parses_back():
    assert set_value(0.5) == "0.5"
    assert set_value("minmax") == "minmax"
    assert set_value([16, 24, 48]) == "[16, 24, 48]"


def test_set_args_overrides_present_keys_and_adds_defaulted_ones():
    params = {"prune": {"ratio": 0.5}, "quantize": {"seed": 0}}
    assert set_args(params, {"prune.ratio": 0.3, "quantize.method": "percentile"}) == [
        "-S", "prune.ratio=0.3", "-S", "++quantize.method=percentile"]
    with pytest.raises(ValueError, match="quantise"):
        set_args(params, {"quantise.method": "minmax"})


def test_experiment_names_are_unique_per_point_and_stable():
    a, b = {"q": "minmax"}, {"q": "percentile"}
    assert experiment_name("s", 0, a) == experiment_name("s", 0, a)
    assert experiment_name("s", 0, a) != experiment_name("s", 1, b)


def _metrics(acc: float, size: int, lat: float) -> dict:
    return {"accuracy": acc, "balanced_accuracy": acc, "defective_recall": acc, "size_bytes": size,
            "latency_p50_ms": lat, "params": 10}


SHOWN = [{
    "rev": "workspace", "name": None, "data": {}, "experiments": None,
}, {
    "rev": "abc", "name": "main", "data": {},
    "experiments": [
        {"executor": {"state": "success"}, "revs": [{"rev": "111", "name": "e1", "data": {
            "params": {"params.yaml": {"data": {"quantize": {"method": "minmax"}}}},
            "metrics": {"reports/teacher/metrics.json": {"data": _metrics(0.8, 1000, 1.0)},
                        "reports/quantized/teacher/metrics.json": {"data": _metrics(0.79, 300, 0.5)},
                        "reports/compare.json": {"data": {"reference": "teacher"}}}}}]},
        {"revs": [{"rev": "222", "name": "e2", "data": {
            "params": {"params.yaml": {"data": {"quantize": {"method": "percentile"}}}},
            "metrics": {"reports/quantized/teacher/metrics.json": {"data": _metrics(0.70, 300, 0.6)}}}}]},
        {"revs": [{"rev": "333", "name": "other-sweep", "data": {}}]},
    ],
}]


def test_experiments_from_show_reads_params_and_per_variant_metrics():
    exps = experiments_from_show(SHOWN, ["e1", "e2"], ["quantize.method"])
    assert [e["name"] for e in exps] == ["e1", "e2"]
    assert exps[0]["settings"] == {"quantize.method": "minmax"} and exps[0]["status"] == "success"
    assert set(exps[0]["variants"]) == {"teacher", "quantized/teacher"}  # compare.json is not a variant


def test_pareto_table_marks_dominated_rows():
    table = pareto_table(experiments_from_show(SHOWN, ["e1", "e2"], ["quantize.method"]))
    flags = {r["name"]: (r["pareto_size"], r["pareto_latency"]) for r in table["rows"]}
    assert flags["e1:quantized/teacher"] == (True, True)
    assert flags["e1:teacher"] == (True, True)  # larger and slower, but the most accurate
    assert flags["e2:quantized/teacher"] == (False, False)  # same size, less accurate, slower
    assert table["rows"][-1]["name"] == "e2:quantized/teacher"


def test_pareto_markdown_tables_experiments_and_models():
    lines = pareto_markdown(pareto_table(experiments_from_show(SHOWN, ["e1", "e2"], ["quantize.method"]))).splitlines()
    at = lines.index("| experiment | status | quantize.method |")
    assert lines[at + 1:at + 4] == ["|---|---|---|", "| e1 | success | minmax |", "| e2 | None | percentile |"]
    assert "| e2 | quantized/teacher | 0.7000 | 0.7000 | 0.7000 | 300 | 0.6 | - |" in lines


def test_pareto_markdown_without_experiments_is_well_formed():
    # no experiment found: the report is still written (before SweepFailed), header and rule alike
    text = pareto_markdown(pareto_table([]))
    assert "| experiment | status |\n|---|---|\n\n## Models" in text and text.endswith("|---|---|---|---|---|---|---|---|\n")


# --- a real sweep ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_runs_real_dvc_experiments_and_writes_the_pareto_table(prefect_server, tiny_reference, tmp_path: Path):
    # setup: a copy of the built tiny workspace, its run committed (dvc exp needs a commit; each
    # experiment then reruns only what its settings change)
    ws = tmp_path / "repo"
    shutil.copytree(tiny_reference["ws"], ws, symlinks=True)
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-q", "-m", "pipeline run")
    grid = {"quantize.method": ["minmax", "percentile"]}

    # execute
    state = sweep(repo=ws, grid=grid, prefix="t", return_state=True)

    # assert: both experiments ran and are in `dvc exp show`, with their params and metrics
    assert state.is_completed(), state
    result = state.result()
    names = [e["name"] for e in result["experiments"]]
    assert len(names) == 2 and all(n.startswith("t-") for n in names)
    assert sorted(e["settings"]["quantize.method"] for e in result["experiments"]) == ["minmax", "percentile"]
    shown = json.loads(sh(ws, "dvc", "exp", "show", "--json").stdout)
    by_name = {e["name"]: e for e in experiments_from_show(shown, names, ["quantize.method"])}
    assert set(by_name) == set(names)
    for exp in by_name.values():
        # run with `dvc exp run --temp`, outside DVC's queue: a finished experiment has no queue status
        assert exp["status"] in (None, "success") and exp["rev"], exp
        assert "quantized/student" in exp["variants"] and "teacher" in exp["variants"]
    # the table: 11 variants per experiment (5 float, their PTQ INT8, the QAT student), a Pareto row per view
    rows = result["rows"]
    assert len(rows) == 22
    assert any(r["pareto_size"] for r in rows) and any(r["pareto_latency"] for r in rows)
    md = (ws / REPORT_MD).read_text()
    assert all(n in md for n in names) and "percentile" in md
    saved = json.loads((ws / REPORT_JSON).read_text())
    assert saved["grid"] == grid and len(saved["rows"]) == len(rows)
    # the Prefect artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert arts and names[0] in arts[0].data
