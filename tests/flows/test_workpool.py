"""flows/workpool.py against the harness's real Prefect server: the pool is created once with the
configured type, a pool of another type is refused by name, and `deploy` without a server says so.
The worker actually running a deployment: tests/integration/test_operations.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate

from flows.env import subprocess_env
from flows.workpool import deployment_names, ensure_work_pool

PROJECT = Path(__file__).resolve().parents[2]


def test_ensure_work_pool_creates_it_once(prefect_server: None) -> None:
    first = ensure_work_pool("lathe-test-process", "process")
    again = ensure_work_pool("lathe-test-process", "process")
    assert (first.type, again.id) == ("process", first.id)


def test_a_pool_of_another_type_is_refused_by_name(prefect_server: None) -> None:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="lathe-test-other", type="prefect-agent"))
    with pytest.raises(ValueError, match="work pool 'lathe-test-other' exists with type 'prefect-agent', not 'process'"):
        ensure_work_pool("lathe-test-other", "process")


def test_deployment_names_carry_the_pool() -> None:
    assert deployment_names("line3") == {"pipeline": "lathe-pipeline/line3-scheduled",
                                         "trigger": "lathe-trigger/line3-data-change"}


def test_deploy_without_a_server_says_what_to_set(tmp_path: Path) -> None:
    env = subprocess_env()
    env.pop("PREFECT_API_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "flows.workpool", "deploy", "--repo", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "set PREFECT_API_URL (or --api-url)" in proc.stderr
