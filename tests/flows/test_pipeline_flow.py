"""flows/pipeline.py against real Prefect (temporary server), real DVC and real git, on a toy repo.

The toy pipeline is a -> b -> c, declared in reverse order in dvc.yaml so the test proves the flow
follows DVC's dependency plan rather than file order; c writes a `cache: false` metrics file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL

from flows.artifacts import FAILURE_ARTIFACT_KEY, METRICS_ARTIFACT_KEY, metrics_markdown, metrics_report
from flows.env import subprocess_env
from flows.failures import StageFailed
from flows.pipeline import plan_stages, run_pipeline

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


def test_metrics_markdown_of_empty_metrics_files_is_a_one_column_table() -> None:
    # it used to write "| variant |  |" rows over a one-column rule
    table = metrics_markdown({"reports/teacher/metrics.json": {}, "reports/student/metrics.json": {}})
    assert table == "| variant |\n|---|\n| teacher |\n| student |\n"


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


def test_metrics_report_shows_the_comparison_and_pictures_with_repo_relative_paths_only(tmp_path: Path) -> None:
    import base64

    from lathe.measure.plots import confusion_png

    root = tmp_path / "checkout-on-the-build-machine"
    (root / "reports/quantized/student").mkdir(parents=True)
    (root / "data/validation").mkdir(parents=True)
    (root / "reports/compare.md").write_text("| variant | size |\n|---|---|\n| student | 173 KB |\n")
    picture = confusion_png([[3, 1], [0, 2]], "quantized/student", ["ok", "bad"], [1])
    (root / "reports/pareto.png").write_bytes(picture)
    (root / "reports/quantized/student/confusion.png").write_bytes(picture)
    (root / "data/validation/result.json").write_text(json.dumps({"success": True, "statistics": {}}))
    (root / "data/validation/summary.md").write_text("ok\n")
    metrics = {"reports/teacher/metrics.json": {"accuracy": 0.7},
               "reports/quantized/teacher/metrics.json": {"accuracy": 0.69}}
    pictures = ["reports/pareto.png", "reports/quantized/student/confusion.png", "reports/training/teacher.png"]

    report = metrics_report(root, metrics, [{"stage": "compare", "status": "ran", "seconds": 1.0}], pictures)

    assert "| student | 173 KB |" in report
    assert "| teacher | 0.7 |" in report and "| quantized/teacher | 0.69 |" in report
    assert "| compare | ran | 1.0 |" in report
    # the Pareto plot is embedded; the packaged variants' confusion matrices would be too (none packaged here)
    assert report.count("](data:image/png;base64,") == 1
    assert f"![reports/pareto.png](data:image/png;base64,{base64.b64encode(picture).decode()})" in report
    assert "- `reports/quantized/student/confusion.png`" in report
    assert "- `reports/training/teacher.png` (missing)" in report
    assert "`data/validation/summary.md` and `data/validation/result.json`" in report
    assert str(tmp_path) not in report and "checkout-on-the-build-machine" not in report


# --- concurrency: one run at a time (Prefect global concurrency limit, then DVC's lock) -----------

SLOW_STAGE = """\
import os, sys, time
name, log, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
run = os.environ.get("LATHE_FLOW_RUN_ID", "?")
with open(log, "a") as f:
    f.write(f"start {name} {run} {time.time()}\\n")
time.sleep(seconds)
open(name + ".txt", "w").write(run)
with open(log, "a") as f:
    f.write(f"end {name} {run} {time.time()}\\n")
"""


def slow_repo(root: Path, timeline: Path, seconds: float, **ops: Any) -> Path:
    """s1 -> s2, both always_changed (every run reruns them) and logging start/end with the flow run id."""
    root.mkdir(parents=True)
    (root / "slow.py").write_text(SLOW_STAGE)
    (root / "params.yaml").write_text(yaml.safe_dump({"ops": ops}))
    stage = lambda name, deps: {"cmd": f"python slow.py {name} {timeline} {seconds}", "deps": deps,  # noqa: E731
                                "outs": [f"{name}.txt"], "always_changed": True}
    return make_repo(root, {"stages": {"s2": stage("s2", ["slow.py", "s1.txt"]), "s1": stage("s1", ["slow.py"])}})


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Start fn in a thread that sees this test's Prefect settings (they live in context variables)."""
    import contextvars
    import threading

    out: dict[str, Any] = {}
    ctx = contextvars.copy_context()
    thread = threading.Thread(target=lambda: out.update(state=ctx.run(fn, *args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def spans(timeline: Path) -> dict[str, tuple[float, float]]:
    """{flow run id: (first stage start, last stage end)}."""
    out: dict[str, list[float]] = {}
    for line in timeline.read_text().splitlines():
        _, _, run, at = line.split()
        out.setdefault(run, []).append(float(at))
    return {run: (min(times), max(times)) for run, times in out.items()}


def test_two_concurrent_runs_never_interleave(prefect_server: None, tmp_path: Path) -> None:
    timeline = tmp_path / "timeline.log"
    repo = slow_repo(tmp_path / "repo", timeline, 1.0, concurrency_limit="lathe-test-wait")

    first, a = in_thread(run_pipeline, repo=repo, return_state=True)
    second, b = in_thread(run_pipeline, repo=repo, return_state=True)
    first.join(180)
    second.join(180)

    assert a["state"].is_completed(), a["state"].message
    assert b["state"].is_completed(), b["state"].message
    runs = spans(timeline)
    assert len(runs) == 2 and len(timeline.read_text().splitlines()) == 8  # 2 runs x 2 stages x start/end
    (start1, end1), (start2, end2) = sorted(runs.values())
    assert end1 <= start2, f"runs overlapped: {runs}"
    lines = [line.split()[:3] for line in timeline.read_text().splitlines()]
    assert lines[:4] == [[e, s, lines[0][2]] for e, s in [("start", "s1"), ("end", "s1"), ("start", "s2"), ("end", "s2")]]


def test_runs_creating_the_concurrency_limit_at_once_all_succeed(prefect_server: None) -> None:
    """Prefect's upsert is read-then-create; racing creators must not fail a run (CI saw a 409 once)."""
    import threading

    from flows.concurrency import ensure_concurrency_limit

    for attempt in range(5):  # fresh names: each round races on a limit that does not exist yet
        name = f"lathe-test-race-{attempt}"
        start, errors = threading.Barrier(8), []

        def create(start: threading.Barrier, name: str, errors: list[str]) -> None:
            start.wait()
            try:
                ensure_concurrency_limit(name)
            except Exception as exc:  # noqa: BLE001 - any failure of a racing creator is the bug
                errors.append(repr(exc))

        threads = [threading.Thread(target=create, args=(start, name, errors)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [], errors
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(name).limit == 1


def test_a_second_run_is_refused_after_the_timeout(prefect_server: None, tmp_path: Path) -> None:
    import time

    from flows.concurrency import PipelineBusy

    timeline = tmp_path / "timeline.log"
    # The timeout also bounds the first run's own acquire call: at 1 s a loaded machine's server answered
    # too late and refused the *first* run (CI, 2026-12-06). 3 s, with the first run holding the slot for
    # two 6 s stages, keeps the second run's whole wait inside the first run's hold.
    repo = slow_repo(tmp_path / "repo", timeline, 6.0, concurrency_limit="lathe-test-refuse",
                     concurrency_timeout_seconds=3)
    first, a = in_thread(run_pipeline, repo=repo, return_state=True)
    deadline = time.monotonic() + 90
    while not (timeline.exists() and timeline.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first run holds the slot once its first stage has started
    assert timeline.exists() and timeline.read_text(), f"the first run started no stage: {a.get('state')}"

    refused = run_pipeline(repo=repo, return_state=True)
    first.join(180)

    assert refused.is_failed()
    exc = refused.result(raise_on_failure=False)
    assert isinstance(exc, PipelineBusy)
    assert "refused: another Lathe pipeline run holds the 'lathe-test-refuse' concurrency slot" in refused.message
    assert a["state"].is_completed(), a["state"].message
    assert set(spans(timeline)) == {str(a["state"].state_details.flow_run_id)}  # the refused run ran nothing
    [artifact] = artifacts(FAILURE_ARTIFACT_KEY, str(refused.state_details.flow_run_id))
    assert "refused" in artifact.data


def test_metrics_report_lists_packages_gates_and_the_validation_report(tmp_path: Path) -> None:
    pkg = tmp_path / "models/packages/gw"
    pkg.mkdir(parents=True)
    (pkg / "manifest.json").write_text(json.dumps({
        "package_id": "0123456789abcdef", "target": {"name": "gw"}, "variant": "quantized/student",
        "raw_data": {"md5": "abc.dir"}, "build": {"time": "2026-11-23T02:00:00Z", "flow_run_id": "run-1"},
        "gates": [{"gate": "max_size_bytes", "limit": 1000, "value": 900, "passed": True}],
    }))
    (tmp_path / "models/packages/gw.tar.gz.sha256").write_text("f" * 64 + "  gw.tar.gz\n")
    (tmp_path / "data/validation").mkdir(parents=True)
    (tmp_path / "data/validation/result.json").write_text(json.dumps(
        {"success": True, "statistics": {"successful_expectations": 9, "evaluated_expectations": 9}}))
    (tmp_path / "data/validation/summary.md").write_text("all good\n")

    report = metrics_report(tmp_path, {}, [])

    assert f"| gw | `0123456789abcdef` | quantized/student | `{'f' * 64}` | max_size_bytes 900 (limit 1000) pass | run-1 |" in report
    assert "Validation passed: 9/9 expectations" in report
    assert "Report: `data/validation/summary.md` and `data/validation/result.json`" in report
    assert str(tmp_path) not in report  # repo-relative paths only: the artifact is read on other machines
