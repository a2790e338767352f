"""`lathe serve` against an existing Prefect server (PREFECT_API_URL: the test harness's, on
loopback): it registers both deployments with the schedules from params, and a run of the pipeline
deployment scheduled ahead is picked up by the served runner, executes the toy pipeline and
completes with its artifacts. `lathe serve` starting its own server, a cron firing, the tiny real
pipeline and work pools: tests/integration/test_operations.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from flows.artifacts import METRICS_ARTIFACT_KEY
from flows.env import subprocess_env
from flows.serve import PIPELINE_DEPLOYMENT, TRIGGER_DEPLOYMENT
from tests.flows.test_pipeline_flow import artifacts, make_repo, toy_stages
from tests.tiny import stop_process

PROJECT = Path(__file__).resolve().parents[2]


def wait_for_deployment(name: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> object:
    from flows.serve import api_healthy

    deadline = time.monotonic() + timeout
    while not api_healthy(str(PREFECT_API_URL.value())) and time.monotonic() < deadline:
        assert server.poll() is None, f"lathe serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert server.poll() is None, f"lathe serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise AssertionError(f"deployment {name} not registered within {timeout} s:\n{log.read_text()[-3000:]}")


def test_lathe_serve_runs_a_scheduled_deployment_to_completion(prefect_server: None, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"ops": {
        "schedule": "30 3 * * *", "trigger_interval_minutes": 60, "concurrency_limit": "lathe-test-serve"}}))
    repo = make_repo(root, {"stages": toy_stages()})
    api_url = str(PREFECT_API_URL.value())
    env = subprocess_env({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / ".prefect"),
                          "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), env.get("PYTHONPATH", "")])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "lathe.cli", "serve", "--repo", str(repo)],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        scheduled = wait_for_deployment(f"lathe-pipeline/{PIPELINE_DEPLOYMENT}", server, log)
        trigger = wait_for_deployment(f"lathe-trigger/{TRIGGER_DEPLOYMENT}", server, log)
        assert [s.schedule.cron for s in scheduled.schedules] == ["30 3 * * *"]
        assert [s.schedule.interval for s in trigger.schedules] == [timedelta(minutes=60)]
        assert scheduled.parameters == {"repo": str(repo)}

        # a run scheduled ahead: the served runner picks it up when it is due
        flow_run = run_deployment(f"lathe-pipeline/{PIPELINE_DEPLOYMENT}", timeout=150, poll_interval=2,
                                  scheduled_time=datetime.now(UTC) + timedelta(seconds=5))

        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-3000:]}"
        assert (repo / "c.txt").read_text() == "abc"
        [artifact] = artifacts(METRICS_ARTIFACT_KEY, str(flow_run.id))
        assert "| toy | 0.75 | 12 |" in artifact.data
        assert f"Lathe: Prefect API {api_url}" in log.read_text()
    finally:
        stop_process(server)


def lathe(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([str(Path(sys.executable).parent / "lathe"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def ctrl_c_as_in_a_terminal() -> None:
    """preexec_fn: SIGINT at its default, as in a terminal. A test run started in the background by a
    non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: Ctrl-C would not reach `lathe serve` at all."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_installed_serve_from_a_subfolder_run_status_pool_deploy_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """`lathe serve --port N` starts its own server; `lathe run` records a run on it, `lathe status` finds
    that server on ops.serve.port by itself and reports the run, `lathe pool deploy` registers in a pool
    there; Ctrl-C (SIGINT to the terminal's process group) stops serve and the server it started."""
    import json
    import re
    import signal
    import socket

    from prefect.settings import temporary_settings

    from flows.serve import api_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({"ops": {
        "schedule": "30 3 * * *", "trigger_interval_minutes": 1440, "concurrency_limit": "lathe-test-cli-serve",
        "serve": {"port": port}, "work_pool": {"name": "lathe-test-cli-pool"}}}))
    repo = make_repo(root, {"stages": toy_stages()})
    sub = repo / "deep" / "er"
    sub.mkdir(parents=True)
    env = subprocess_env({"PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "lathe"), "serve", "--port", str(port)], cwd=sub,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            wait_for_deployment(f"lathe-pipeline/{PIPELINE_DEPLOYMENT}", server, log, timeout=180)
            trigger = wait_for_deployment(f"lathe-trigger/{TRIGGER_DEPLOYMENT}", server, log)
            assert trigger.parameters == {"repo": str(repo)}  # the git work tree around the sub-folder
            with get_client(sync_client=True) as client:
                client.pause_deployment(trigger.id)  # only `lathe run` below runs the pipeline

        ran = lathe("run", cwd=sub, env={**env, "PREFECT_API_URL": api_url})
        assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
        run_id = re.search(r"flow run ([0-9a-f-]{36})", ran.stdout).group(1)

        status = lathe("status", "--json", cwd=sub, env=env)  # no PREFECT_API_URL: ops.serve.port answers
        assert status.returncode == 0, status.stderr
        last = json.loads(status.stdout)["last_run"]
        assert (last["id"], last["state"], last["source"]) == (run_id, "Completed", f"Prefect API {api_url}")
        assert json.loads(status.stdout)["stale"] == {}

        deployed = lathe("pool", "deploy", "--api-url", api_url, cwd=sub, env=env)
        assert deployed.returncode == 0, deployed.stderr
        assert "registered lathe-trigger/lathe-test-cli-pool-data-change" in deployed.stdout
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            assert client.read_work_pool("lathe-test-cli-pool").type == "process"
            pooled = client.read_deployment_by_name("lathe-pipeline/lathe-test-cli-pool-scheduled")
            assert pooled.parameters == {"repo": str(repo)}
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the terminal that runs `lathe serve`
        try:
            server.wait(60)
            stopped_by_ctrl_c = True
        except subprocess.TimeoutExpired:
            stopped_by_ctrl_c = False
            stop_process(server)
    assert stopped_by_ctrl_c, "Ctrl-C did not stop lathe serve within 60 s:\n" + log.read_text()[-3000:]
    assert server.returncode == 0, log.read_text()[-3000:]
    assert "stopped" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not api_healthy(api_url), "the server lathe serve started still answers after Ctrl-C"
