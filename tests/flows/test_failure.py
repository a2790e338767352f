"""Failure semantics of flows/pipeline.py and flows/failures.py: transient failures are retried (visible in the task run's
state history), data failures are not and end the run Failed with the failed expectations."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

from flows.artifacts import FAILURE_ARTIFACT_KEY
from flows.failures import StageFailed, classify_failure, retry_transient
from flows.pipeline import load_ops, run_pipeline
from lathe.errors import DATA_ERROR_EXIT
from tests.flows.test_pipeline_flow import artifacts, make_repo

SUMMARY = "| expectation | column | result |\n|---|---|---|\n| expect_column_values_to_be_in_set | label | FAILED: 7 rows with label 9 |\n"


def ops_params(**ops: Any) -> str:
    return yaml.safe_dump({"ops": {"retries": 2, "retry_delay_seconds": 0.2, **ops}})


def task_runs(flow_run_id: str) -> dict[str, Any]:
    """{task run name: (task run, [state names in order])} of one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name: (run, [s.name for s in sorted(client.read_task_run_states(run.id),
                                                          key=lambda s: s.timestamp)]) for run in runs}


# --- classification (no server) -------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "returncode", "stderr", "kind"), [
    ("validate", 1, "[validate] FAILED: 2 of 9 expectations failed\nERROR: failed to reproduce 'validate': "
                    "failed to run: python -m stages.validate, exited with 1", "data"),
    ("train_teacher", 1, "ERROR: failed to reproduce 'train_teacher': failed to run: x, exited with "
                         f"{DATA_ERROR_EXIT}", "data"),
    ("train_teacher", 1, "ERROR: failed to reproduce 'train_teacher': failed to run: x, exited with -9", "transient"),
    ("validate", 1, "ERROR: failed to reproduce 'validate': failed to run: x, exited with -9", "transient"),
    ("prune", 255, "ERROR: failed to reproduce 'prune': failed to run: x, exited with 137", "transient"),  # sh: SIGKILL
    ("prune", 255, "ERROR: failed to reproduce 'prune': failed to run: x, exited with 143", "transient"),  # sh: SIGTERM
    ("prune", 255, "ERROR: failed to reproduce 'prune': failed to run: x, exited with 130", "error"),  # Ctrl-C
    ("package@gw", -9, "", "transient"),
    ("ingest", 1, "ERROR: Unable to acquire lock. Most likely another DVC process is running", "transient"),
    ("s1", 1, "ERROR: failed to reproduce 's1': '/r/s1.txt' is busy, it is being blocked by:\n(PID 7: ...)", "transient"),
    ("train_teacher", 1, "[train_teacher] FAILED: bad arch\nERROR: ... exited with 1", "error"),
])
def test_classify_failure(stage: str, returncode: int, stderr: str, kind: str) -> None:
    assert classify_failure(stage, returncode, stderr) == kind


def test_only_transient_failures_are_retried() -> None:
    assert retry_transient(None, None, Failed(data=StageFailed("a", "killed", -9, kind="transient")))
    assert not retry_transient(None, None, Failed(data=StageFailed("validate", "bad", 1, kind="data")))
    assert not retry_transient(None, None, Failed(data=StageFailed("a", "bug", 1, kind="error")))
    assert not retry_transient(None, None, Failed(data=ValueError("x")))


def test_ops_defaults_and_params(tmp_path: Path) -> None:
    assert load_ops(tmp_path).schedule == "0 2 * * *"  # no params.yaml: defaults
    (tmp_path / "params.yaml").write_text(ops_params(schedule="*/5 * * * *"))
    ops = load_ops(tmp_path)
    assert (ops.retries, ops.retry_delay_seconds, ops.schedule) == (2, 0.2, "*/5 * * * *")


# --- against a real Prefect server ----------------------------------------------------------------


# DVC runs a stage's command through $SHELL (else /bin/sh). bash execs a lone command, so a killed
# child shows as -9; dash waits for it and reports 137. Both must count as transient.
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_transient_failure_is_retried_and_shows_in_the_run_history(prefect_server: None, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, shell: str) -> None:
    monkeypatch.setenv("SHELL", shell)
    marker = tmp_path / "killed-once"
    flaky = textwrap.dedent(f"""\
        import os, pathlib, signal
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)  # a transient failure: the process is killed
        pathlib.Path("flaky.txt").write_text("ok")
    """)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "flaky.py").write_text(flaky)
    (root / "params.yaml").write_text(ops_params(concurrency_limit="lathe-test-transient"))
    repo = make_repo(root, {"stages": {"flaky": {"cmd": "python flaky.py", "deps": ["flaky.py"], "outs": ["flaky.txt"]}}})

    state = run_pipeline(repo=repo, return_state=True)

    assert state.is_completed(), state.message
    assert (repo / "flaky.txt").read_text() == "ok"
    [(run, history)] = task_runs(str(state.state_details.flow_run_id)).values()
    assert run.run_count == 2
    assert "AwaitingRetry" in history and history[-1] == "Completed", history
    assert history.count("Running") + history.count("Retrying") == 2, history


def test_validation_failure_is_not_retried_and_publishes_failed_expectations(prefect_server: None, tmp_path: Path) -> None:
    write = ("import os, sys; os.makedirs('data/validation', exist_ok=True); "
             f"open('data/validation/summary.md', 'w').write({SUMMARY!r}); "
             "print('[validate] FAILED: 1 of 9 expectations failed (data/validation/summary.md)', file=sys.stderr); "
             "sys.exit(1)")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "validate.py").write_text(write)
    (root / "params.yaml").write_text(ops_params(concurrency_limit="lathe-test-data"))
    repo = make_repo(root, {"stages": {
        "validate": {"cmd": "python validate.py", "deps": ["validate.py"], "outs": [{"data/validation": {"persist": True}}]},
        "train": {"cmd": "python -c \"open('t.txt', 'w').write('t')\"", "deps": ["data/validation"], "outs": ["t.txt"]},
    }})

    state = run_pipeline(repo=repo, return_state=True)

    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StageFailed) and exc.kind == "data" and exc.stage == "validate"
    flow_run_id = str(state.state_details.flow_run_id)
    runs = task_runs(flow_run_id)
    assert list(runs) == ["validate"]  # train never started
    run, history = runs["validate"]
    assert run.run_count == 1 and "AwaitingRetry" not in history, history
    [artifact] = artifacts(FAILURE_ARTIFACT_KEY, flow_run_id)
    assert "data failure, not retried" in artifact.data
    assert "label 9" in artifact.data  # the failed expectations themselves
    assert "| train | not run | – |" in artifact.data
