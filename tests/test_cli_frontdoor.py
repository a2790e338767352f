"""The front door as a user meets it: the installed `lathe` executable (the venv's bin/lathe, a
subprocess), started from a sub-folder of a real git + DVC repository.

Help shows every default and only flags for booleans; `run` and `status` on a toy pipeline (real DVC,
real Prefect: `run` without a server starts Prefect's temporary one, and `status` then reads that run
back from Prefect's database on disk); one-line errors for `exp` and `pool deploy`. `serve`, `pool
deploy` and `status` against a live server, and Ctrl-C: tests/flows/test_serve.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from flows.env import subprocess_env
from lathe.cli import app
from tests.flows.test_pipeline_flow import make_repo, toy_stages
from tests.packages import build_package, make_keys

LATHE = Path(sys.executable).parent / "lathe"


def lathe(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LATHE), *args], cwd=cwd, env=env or user_env(cwd), capture_output=True, text=True,
                          timeout=300)


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: no server configured, Prefect's home not set (lathe puts it in <repo>/.prefect), wide help."""
    env = subprocess_env({"COLUMNS": "250"})
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command and group of the CLI (typer's own click) with its argv path."""
    out = [(path, group)]
    if hasattr(group, "list_commands"):
        for name in group.list_commands(None):
            out += commands(group.get_command(None, name), (*path, name))
    return out


def test_help_of_every_command_shows_every_default_and_booleans_are_flags(tmp_path):
    tree = commands(typer.main.get_command(app))
    names = {" ".join(p) for p, _ in tree}
    assert {"run", "exp", "pool", "pool deploy", "status", "serve", "trace", "verify", "keys init"} <= names
    for path, command in tree:
        res = lathe(*path, "--help", cwd=tmp_path)
        assert res.returncode == 0, (path, res.stderr)
        text = res.stdout
        assert "BOOLEAN" not in text.upper(), path  # never `--json <bool>`
        options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
        for option in options:
            if option.is_flag and not option.secondary_opts:
                continue  # a lone switch (--debug, --json): off unless given
            listed = text.split("\nOptions:\n", 1)[1]
            # the option's row and its wrapped continuation lines, up to the next option
            row = re.search(rf"^  {re.escape(option.opts[0])}\b.*?(?=^  -|\Z)", listed, re.M | re.S)
            assert row is not None, (path, option.opts[0], text)
            assert "[default:" in row.group(0), (path, row.group(0))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed toy repo (a -> b -> c, never run) with a real signed package, and a sub-folder to work from."""
    root = tmp_path_factory.mktemp("frontdoor") / "repo"
    root.mkdir()
    # ops.serve.port: status looks for `lathe serve`'s server there; nothing of another test answers on it
    (root / "params.yaml").write_text(yaml.safe_dump({"ops": {"serve": {"port": free_port()},
                                                              "concurrency_limit": "lathe-test-frontdoor"}}))
    repo = make_repo(root, {"stages": toy_stages()})
    keys = make_keys(root / ".keys")
    build_package(repo / "models" / "packages", keys["priv"], target="line-pc")
    (repo / "docs" / "deep").mkdir(parents=True)
    return repo


def test_status_from_a_subfolder_lists_stale_stages_and_packages(toy):
    res = lathe("status", "--json", cwd=toy / "docs" / "deep")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["repo"] == str(toy)
    assert set(report["stale"]) == {"a", "b", "c"}  # never run: every stage is stale
    assert report["last_run"] is None  # no server, no Prefect database, no package names a run
    [pkg] = report["packages"]
    manifest = json.loads((toy / "models/packages/line-pc/manifest.json").read_text())
    assert pkg["package_id"] == manifest["package_id"] and pkg["target"] == "line-pc"
    assert pkg["variant"] == manifest["variant"]
    assert pkg["model_bytes"] == (toy / "models/packages/line-pc/model.onnx").stat().st_size
    view = lathe("status", cwd=toy / "docs" / "deep")
    assert view.returncode == 0, view.stderr
    assert "stale: 3" in view.stdout and "last run: none recorded" in view.stdout
    assert manifest["package_id"] in view.stdout


def test_run_from_a_subfolder_then_status_reads_the_run_back_from_disk(toy):
    res = lathe("run", "--stage", "b", cwd=toy / "docs" / "deep")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (toy / "b.txt").read_text() == "ab" and not (toy / "c.txt").exists()  # b and its upstream only
    run_id = re.search(r"flow run ([0-9a-f-]{36})", res.stdout).group(1)
    assert (toy / ".prefect" / "prefect.db").is_file()  # Prefect's state inside the repo, not in ~/.prefect

    status = json.loads(lathe("status", "--json", cwd=toy / "docs").stdout)
    assert set(status["stale"]) == {"c"}
    assert status["last_run"]["id"] == run_id and status["last_run"]["state"] == "Completed"
    assert status["last_run"]["source"].startswith("Prefect database")


def test_run_and_status_outside_a_repository_fail_in_one_line(tmp_path):
    for command in ("run", "status", "exp"):
        res = lathe(command, cwd=tmp_path)
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.startswith("error: ") and "no dvc.yaml" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_exp_and_pool_deploy_refuse_bad_input_in_one_line(toy):
    res = lathe("exp", "--set", "prune.ratio", cwd=toy / "docs")
    assert res.returncode == 1 and res.stderr.startswith("error: --set: expected KEY=V1,V2"), res.stderr
    env = user_env(toy)
    res = lathe("pool", "deploy", cwd=toy / "docs", env=env)
    assert res.returncode == 1 and "set PREFECT_API_URL (or --api-url)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = lathe("pool", "deploy", "--api-url", f"http://127.0.0.1:{free_port()}/api", cwd=toy, env=env)
    assert res.returncode == 1 and "no Prefect server answers" in res.stderr, res.stderr


def test_python_m_entry_points_still_parse(tmp_path):
    """`python -m flows.*` and `python -m lathe.cli` keep working beside the front door."""
    env = {**user_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])])}
    for module in ("flows.pipeline", "flows.experiments", "flows.workpool", "lathe.cli"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), (module, res.stderr[-2000:])
