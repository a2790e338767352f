"""flows/precheck.py inside the real pipeline flow: a bad config fails the run in seconds, before any stage.

A real Prefect server (the session's temporary one), a real git + DVC workspace of the project
(tests/tiny.make_workspace) and the real dvc.yaml: nothing but the check stands between the flow and
`dvc repro` of the ingest stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.artifacts import FAILURE_ARTIFACT_KEY
from flows.pipeline import run_pipeline
from flows.precheck import CheckFailed
from tests.flows.test_failure import task_runs
from tests.flows.test_pipeline_flow import artifacts
from tests.tiny import make_workspace, tiny_params


@pytest.fixture(scope="module")
def bad_targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = tiny_params(ops={"concurrency_limit": "lathe-test-precheck"})
    params["targets"] = {"tiny-gw": {"defective_recall_target": 0.5, "gates": {"max_sise_bytes": 10_000_000}},
                         "Line PC": {"threads": 2}}
    return make_workspace(tmp_path_factory.mktemp("precheck") / "ws", params)


def test_a_bad_targets_entry_fails_the_flow_within_5_seconds_and_runs_no_stage(prefect_server: None,
                                                                                bad_targets: Path) -> None:
    start = time.monotonic()
    state = run_pipeline(repo=bad_targets, return_state=True)
    wall = time.monotonic() - start

    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, CheckFailed) and exc.count == 2, exc
    assert "params.yaml: targets.tiny-gw.gates.max_sise_bytes: unknown key (did you mean 'max_size_bytes'?)" in str(exc)
    assert "params.yaml: targets.Line PC: target name must match" in str(exc)
    flow_run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    ran = (run.end_time - run.start_time).total_seconds()  # the server's record: Running -> Failed
    assert ran < 5, f"flow ran {ran:.1f} s before failing"
    assert wall < 15, f"run_pipeline took {wall:.1f} s"  # 3.6 s measured: creating the flow run adds ~2 s
    assert task_runs(flow_run_id) == {}  # no dvc-stage task started
    assert not (bad_targets / "data" / "prepared").exists() and not (bad_targets / "models").exists()
    [artifact] = artifacts(FAILURE_ARTIFACT_KEY, flow_run_id)
    assert "before any stage" in artifact.data and "max_sise_bytes" in artifact.data
    print(f"flow failed after {ran:.2f} s running ({wall:.2f} s wall, flow run creation included)")
