"""flows/pipeline.py against real Prefect (temporary server), real DVC and real git, on a toy repo.

The toy pipeline is a -> b -> c, declared in reverse order in dvc.yaml so the test proves the flow
follows DVC's dependency plan rather than file order; c writes a `cache: false` metrics file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.env import subprocess_env
from flows.pipeline import (  # imported before prefect: applies the offline env
    FAILURE_ARTIFACT_KEY,
    METRICS_ARTIFACT_KEY,
    StageFailed,
    metrics_markdown,
    metrics_report,
    plan_stages,
    run_pipeline,
)

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

FAIL_B = "python -c \"import sys; print('[b] FAILED: bad file x.png', file=sys.stderr); sys.exit(1)\""
METRICS = {"accuracy": 0.75, "size": {"kb": 12}}


def toy_stages(fail_b: bool = False) -> dict[str, Any]:
    """c <- b <- a, written downstream-first."""
    write_c = (
        "import json, os; os.makedirs('reports/toy', exist_ok=True); "
        "open('c.txt', 'w').write(open('b.txt').read() + 'c'); "
        f"json.dump({METRICS!r}, open('reports/toy/metrics.json', 'w'))"
    )
    return {
        "c": {
            "cmd": f'python -c "{write_c}"',
            "deps": ["b.txt"],
            "outs": ["c.txt"],
            "metrics": [{"reports/toy/metrics.json": {"cache": False}}],
        },
        "b": {
            "cmd": FAIL_B if fail_b else "python -c \"open('b.txt', 'w').write(open('a.txt').read() + 'b')\"",
            "deps": ["a.txt"],
            "outs": ["b.txt"],
        },
        "a": {"cmd": "python -c \"open('a.txt', 'w').write('a')\"", "outs": ["a.txt"]},
    }


def make_repo(root: Path, dvc_yaml: dict[str, Any]) -> Path:
    """A committed git + DVC repo at `root` holding `dvc_yaml`."""
    root.mkdir(parents=True, exist_ok=True)
    env = subprocess_env()

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "lathe-test@example.invalid")
    sh("git", "config", "user.name", "lathe test")
    sh("git", "config", "commit.gpgsign", "false")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "toy pipeline")
    return root


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (10-20 s to start here) for every flow test."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def artifacts(key: str, flow_run_id: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )


@pytest.fixture(scope="module")
def first_run(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    repo = make_repo(tmp_path_factory.mktemp("toy") / "repo", {"stages": toy_stages()})
    return repo, run_pipeline(repo=repo, return_state=True)


# --- planning (DVC only, no Prefect server) ------------------------------------------------------


def test_plan_stages_follows_dependencies_and_expands_foreach(tmp_path: Path) -> None:
    # setup: evaluate (foreach) is declared before what it depends on
    stages = {
        "evaluate": {
            "foreach": ["student", "teacher"],
            "do": {"cmd": "echo ${item} > eval_${item}.txt", "deps": ["${item}.txt"], "outs": ["eval_${item}.txt"]},
        },
        "distill": {"cmd": "echo s > student.txt", "deps": ["teacher.txt"], "outs": ["student.txt"]},
        "train": {"cmd": "echo t > teacher.txt", "deps": ["data.txt"], "outs": ["teacher.txt"]},
        "prepare": {"cmd": "echo d > data.txt", "outs": ["data.txt"]},
    }
    repo = make_repo(tmp_path / "repo", {"stages": stages})

    # execute
    everything = plan_stages(repo)
    again = plan_stages(repo)
    only_teacher_eval = plan_stages(repo, ["evaluate@teacher"])

    # assert: each stage after everything it depends on; same answer every time
    assert sorted(everything) == sorted(
        ["prepare", "train", "distill", "evaluate@student", "evaluate@teacher"]
    )
    position = {name: i for i, name in enumerate(everything)}
    for upstream, downstream in [
        ("prepare", "train"),
        ("train", "distill"),
        ("distill", "evaluate@student"),
        ("train", "evaluate@teacher"),
    ]:
        assert position[upstream] < position[downstream]
    assert everything == again
    assert only_teacher_eval == ["prepare", "train", "evaluate@teacher"]


def test_metrics_markdown_is_variant_by_metric() -> None:
    table = metrics_markdown(
        {
            "reports/teacher/metrics.json": {"accuracy": 0.71534, "size_kb": 4950},
            "reports/student/metrics.json": {"accuracy": 0.727, "latency.p50_ms": 0.17},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| variant | accuracy | size_kb | latency.p50_ms |"
    assert lines[2] == "| teacher | 0.7153 | 4950 | – |"
    assert lines[3] == "| student | 0.727 | – | 0.17 |"


# --- the flow ------------------------------------------------------------------------------------


def test_flow_runs_every_stage_in_order_and_publishes_metrics(first_run: tuple[Path, Any]) -> None:
    repo, state = first_run

    assert state.is_completed(), state.message
    result = state.result()
    json.dumps(result)  # a small JSON result, nothing pickled
    assert [r["stage"] for r in result["stages"]] == ["a", "b", "c"]
    assert [r["status"] for r in result["stages"]] == ["ran", "ran", "ran"]
    assert all(r["returncode"] == 0 for r in result["stages"])
    assert (repo / "c.txt").read_text() == "abc"
    assert result["metrics"] == {"reports/toy/metrics.json": {"accuracy": 0.75, "size.kb": 12}}

    [artifact] = artifacts(METRICS_ARTIFACT_KEY, result["flow_run_id"])
    assert artifact.type == "markdown"
    assert "| variant | accuracy | size.kb |" in artifact.data
    assert "| toy | 0.75 | 12 |" in artifact.data


def test_second_run_reruns_nothing(first_run: tuple[Path, Any]) -> None:
    repo, _ = first_run
    lock_before = (repo / "dvc.lock").read_text()

    result = run_pipeline(repo=repo)

    assert [(r["stage"], r["status"], r["ran"]) for r in result["stages"]] == [
        ("a", "skipped", False),
        ("b", "skipped", False),
        ("c", "skipped", False),
    ]
    assert (repo / "dvc.lock").read_text() == lock_before


def test_failing_stage_fails_the_run_and_stops_downstream(prefect_server: None, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"stages": toy_stages(fail_b=True)})

    state = run_pipeline(repo=repo, return_state=True)

    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StageFailed)
    assert exc.stage == "b"
    assert exc.message == "[b] FAILED: bad file x.png"
    assert "x.png" in state.message
    assert (repo / "a.txt").exists()
    assert not (repo / "c.txt").exists()
    assert not (repo / "reports").exists()

    flow_run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_failed()
    [artifact] = artifacts(FAILURE_ARTIFACT_KEY, flow_run_id)
    assert "`b`" in artifact.data and "x.png" in artifact.data
    assert "| c | not run | – |" in artifact.data
    assert artifacts(METRICS_ARTIFACT_KEY, flow_run_id) == []


def test_cli_exits_nonzero_with_the_stage_message(prefect_server: None, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"stages": toy_stages(fail_b=True)})
    # point the child at this test server instead of letting it start its own
    env = subprocess_env({"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / ".prefect")})
    project = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(project), env.get("PYTHONPATH", "")])

    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "lathe pipeline: stage 'b' failed: [b] FAILED: bad file x.png" in proc.stderr
    assert not (repo / "c.txt").exists()


def test_metrics_report_shows_the_comparison_markdown_instead_of_its_json(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/compare.md").write_text("| variant | size |\n|---|---|\n| student | 173 KB |\n")
    metrics = {"reports/teacher/metrics.json": {"accuracy": 0.7},
               "reports/compare.json": {"variants.teacher.metrics.accuracy": 0.7}}

    report = metrics_report(tmp_path, metrics, [{"stage": "compare", "status": "ran", "seconds": 1.0}])

    assert "| student | 173 KB |" in report
    assert "| teacher | 0.7 |" in report
    assert "variants.teacher" not in report
    assert "| compare | ran | 1.0 |" in report
