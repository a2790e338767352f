"""Unattended operation end to end on the tiny real pipeline (issue 5), one workspace, in order:

1. `lathe serve` starts its own `prefect server start` on 127.0.0.1 (SQLite under PREFECT_HOME) and
   serves the deployments; the pipeline deployment's cron fires a minute ahead. The run the
   scheduler creates executes every stage of the tiny pipeline and completes with its artifacts; the
   packages record its flow run id.
2. Scale-out: `python -m flows.workpool deploy` registers the flows in a process work pool on that
   server; a `prefect worker start` runs a deployment run of the data-change trigger: nothing
   changed, so no stage runs, and the run says so in its artifact.
3. Data change: an image is added to data/raw, `dvc add`ed and committed; the next trigger run
   (through the worker again) reproduces the pipeline and repackages from the new data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.artifacts import METRICS_ARTIFACT_KEY
from flows.env import subprocess_env
from flows.serve import PIPELINE_DEPLOYMENT, TRIGGER_DEPLOYMENT, api_healthy
from flows.trigger import TRIGGER_ARTIFACT_KEY
from flows.workpool import deployment_names
from lathe.data.raw import RawSample, read_labels, synth_image, write_labels
from tests.tiny import make_workspace, sh, stop_process, tiny_params

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
POOL = "lathe-test-pool"
TARGET = "tiny-gw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cron_a_minute_ahead(now: datetime) -> tuple[str, datetime]:
    """A daily cron (UTC) for the first whole minute at least 60 s after `now`, and that time."""
    fire = (now + timedelta(seconds=60)).replace(second=0, microsecond=0) + timedelta(minutes=1)
    return f"{fire.minute} {fire.hour} * * *", fire


def child_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = subprocess_env({"PREFECT_HOME": str(home), "PREFECT_RUNNER_POLL_FREQUENCY": "2",
                          "PREFECT_WORKER_QUERY_SECONDS": "2"})
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.get("PYTHONPATH", "")])
    return env


def wait_until(what: str, check: Any, timeout: float, procs: dict[str, tuple[subprocess.Popen, Path]]) -> Any:
    """Poll `check()` until it returns something truthy; fail early if a helper process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        result = check()
        if result:
            return result
        time.sleep(2)
    logs = "\n".join(f"--- {name}\n{log.read_text()[-2500:]}" for name, (_, log) in procs.items())
    raise AssertionError(f"{what}: not within {timeout:g} s\n{logs}")


def deployment_runs(deployment_name: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return []
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


def artifact_data(key: str, flow_run_id: str) -> list[str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [a.data for a in found]


def manifest(ws: Path) -> dict[str, Any]:
    return json.loads((ws / "models" / "packages" / TARGET / "manifest.json").read_text())


def add_image(ws: Path) -> str:
    """One more (generated) defective mono cell in data/raw with its label row, `dvc add`ed and committed."""
    import io

    import numpy as np
    from PIL import Image

    raw = ws / "data" / "raw"
    samples = read_labels(raw)
    new = f"images/c3_mono_{len(samples):03d}.png"
    buf = io.BytesIO()
    Image.fromarray(synth_image(np.random.default_rng(99), 32, 3, "mono")).save(buf, format="PNG")
    (raw / new).write_bytes(buf.getvalue())
    write_labels(raw, [*samples, RawSample(new, "defective", {"defect_probability": "1.0", "cell_type": "mono"})],
                 ["defect_probability", "cell_type"])
    sh(ws, "dvc", "add", "-q", "data/raw")
    sh(ws, "git", "add", "data/raw.dvc")
    sh(ws, "git", "commit", "-q", "-m", "one more inspection image")
    return new


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ops")
    cron, fire = cron_a_minute_ahead(datetime.now(UTC))
    params = tiny_params()
    params["ops"] = {"schedule": cron, "timezone": "UTC", "retries": 1, "retry_delay_seconds": 1,
                     "concurrency_limit": "lathe-test-ops", "trigger_interval_minutes": 1440,
                     "work_pool": {"name": POOL, "type": "process"}}
    ws = make_workspace(tmp / "ws", params)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        # the installed console script, from outside the repo, as a user runs it (not `python -m`)
        server = subprocess.Popen([str(Path(sys.executable).parent / "lathe"), "serve", "--repo", str(ws),
                                   "--port", str(port)],
                                  cwd=tmp, env=child_env(tmp / "prefect-home", None), stdout=out,
                                  stderr=subprocess.STDOUT)
    procs = {"lathe serve": (server, log)}
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            wait_until("lathe serve's own server answers", lambda: api_healthy(api_url), 150, procs)
            trigger = wait_until("the trigger deployment is registered",
                                 lambda: _deployment(f"lathe-trigger/{TRIGGER_DEPLOYMENT}"), 120, procs)
            with get_client(sync_client=True) as client:
                client.pause_deployment(trigger.id)  # only the cron run may build the workspace here
            yield {"ws": ws, "api_url": api_url, "tmp": tmp, "procs": procs, "cron": cron, "fire": fire}
    finally:
        stop_process(server)


def _deployment(name: str) -> Any:
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


@pytest.fixture(scope="module")
def scheduled_run(served: dict[str, Any]) -> FlowRun:
    name = f"lathe-pipeline/{PIPELINE_DEPLOYMENT}"
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        def finished() -> FlowRun | None:
            runs = [r for r in deployment_runs(name) if r.state and r.state.is_final()]
            return runs[0] if runs else None

        # the cron fires within ~2 min of serving; the tiny pipeline then takes ~1.5-3 min on 2 cores
        return wait_until("the scheduled run finished", finished, 600, served["procs"])


def test_serve_started_its_own_server_and_registered_both_schedules(served):
    assert (served["tmp"] / "prefect-home" / "prefect.db").is_file()  # SQLite inside PREFECT_HOME
    log = served["procs"]["lathe serve"][1].read_text()
    assert f"UI {served['api_url'].removesuffix('/api')}" in log
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        pipeline = _deployment(f"lathe-pipeline/{PIPELINE_DEPLOYMENT}")
        trigger = _deployment(f"lathe-trigger/{TRIGGER_DEPLOYMENT}")
    assert [s.schedule.cron for s in pipeline.schedules] == [served["cron"]]
    assert [s.schedule.interval for s in trigger.schedules] == [timedelta(minutes=1440)]
    assert pipeline.parameters == trigger.parameters == {"repo": str(served["ws"])}


def test_the_ui_of_a_server_on_another_port_calls_the_api_on_that_port(served):
    """The UI's settings endpoint (what the browser app reads) names the served port, not 4200."""
    import urllib.request

    base = served["api_url"].removesuffix("/api")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as res:
        settings = json.loads(res.read())
    assert settings["api_url"] == served["api_url"]


def test_the_cron_run_executes_the_pipeline_and_completes_with_its_artifacts(served, scheduled_run):
    ws = served["ws"]
    run = scheduled_run
    assert run.state.is_completed(), f"{run.state}\n{served['procs']['lathe serve'][1].read_text()[-3000:]}"
    assert run.auto_scheduled, "the run was not created by the server's scheduler"
    assert run.expected_start_time == served["fire"], (run.expected_start_time, served["cron"])
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        [metrics] = artifact_data(METRICS_ARTIFACT_KEY, str(run.id))
    assert "| teacher |" in metrics and "| quantized/student |" in metrics  # metrics of every variant
    assert f"| {TARGET} | `{manifest(ws)['package_id']}` |" in metrics  # the package table: id, sha256, gates
    assert str(run.id) in metrics
    assert manifest(ws)["build"]["flow_run_id"] == str(run.id)
    status = sh(ws, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout


@pytest.fixture(scope="module")
def worker(served: dict[str, Any], scheduled_run: FlowRun) -> Iterator[None]:
    tmp, api_url = served["tmp"], served["api_url"]
    env = child_env(tmp / "worker-home", api_url)
    deployed = subprocess.run([sys.executable, "-m", "flows.workpool", "deploy", "--repo", str(served["ws"])],
                              cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"work pool '{POOL}'" in deployed.stdout
    log = tmp / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
                                cwd=PROJECT, env=env, stdout=out, stderr=subprocess.STDOUT)
    served["procs"]["worker"] = (proc, log)
    try:
        yield
    finally:
        served["procs"].pop("worker")
        # Prefect 3.8.8's process worker does not exit on SIGTERM or SIGINT alone (measured: still running
        # 70 s later, idle, its server up; README "Scale-out"); waiting longer only costs the suite a minute
        stop_process(proc, timeout=10)


def run_trigger_through_the_pool(served: dict[str, Any]) -> FlowRun:
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        run = run_deployment(deployment_names(POOL)["trigger"], timeout=600, poll_interval=2)
        assert run.state.is_completed(), f"{run.state}\n{served['procs']['worker'][1].read_text()[-3000:]}"
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(POOL).type == "process"
            assert run.work_pool_name == POOL
        return run


def test_a_worker_runs_the_trigger_through_the_work_pool_and_no_change_runs_no_stage(served, worker):
    before = manifest(served["ws"])

    lock = (served["ws"] / "dvc.lock").read_text()

    run = run_trigger_through_the_pool(served)

    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        [note] = artifact_data(TRIGGER_ARTIFACT_KEY, str(run.id))
    assert "no change, nothing run" in note, note
    assert manifest(served["ws"]) == before  # nothing repackaged
    assert (served["ws"] / "dvc.lock").read_text() == lock  # no stage ran


def test_an_added_image_makes_the_next_trigger_run_reproduce_and_repackage(served, worker):
    ws = served["ws"]
    before = manifest(ws)
    new_image = add_image(ws)
    raw_md5 = yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]

    run = run_trigger_through_the_pool(served)

    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        [note] = artifact_data(TRIGGER_ARTIFACT_KEY, str(run.id))
    assert "CHANGED, running the pipeline" in note, note
    after = manifest(ws)
    assert after["raw_data"]["md5"] == raw_md5 != before["raw_data"]["md5"]
    assert after["package_id"] != before["package_id"]
    assert new_image in (ws / "data" / "prepared" / "manifest.csv").read_text()
    status = sh(ws, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout


def test_sigterm_stops_lathe_serve_and_the_server_it_started(served):  # last: ends the module's server
    server, log = served["procs"].pop("lathe serve")
    stop_process(server)
    assert server.returncode is not None
    assert not api_healthy(served["api_url"]), f"the server started by lathe serve still answers\n{log.read_text()[-2000:]}"
