"""flows/trigger.py on a toy repo with DVC-tracked raw data and a toy `package` stage whose manifest
records the raw md5, as the real package stage does: nothing changed -> no stage runs; a file
added and `dvc add`ed -> the pipeline reruns and repackages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from flows.env import subprocess_env
from flows.trigger import TRIGGER_ARTIFACT_KEY, check_data, raw_md5, run_if_data_changed  # before prefect
from tests.flows.test_failure import task_runs
from tests.flows.test_pipeline_flow import artifacts, make_repo

PACKAGE = """\
import json, os, time, yaml
md5 = yaml.safe_load(open("data/raw.dvc"))["outs"][0]["md5"]
os.makedirs("models/packages/toy", exist_ok=True)
json.dump({"package_id": md5[:16], "target": {"name": "toy"}, "raw_data": {"md5": md5},
           "gates": [], "build": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "flow_run_id": os.environ.get("LATHE_FLOW_RUN_ID")}},
          open("models/packages/toy/manifest.json", "w"))
"""


def dvc_add(repo: Path, name: str, text: str) -> None:
    (repo / "data/raw").mkdir(parents=True, exist_ok=True)
    (repo / "data/raw" / name).write_text(text)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw"], cwd=repo, env=subprocess_env(),
                   check=True, capture_output=True)


def test_trigger_runs_the_pipeline_only_when_raw_data_changed(prefect_server: None, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "package.py").write_text(PACKAGE)
    (root / "params.yaml").write_text(yaml.safe_dump({"ops": {"concurrency_limit": "lathe-test-trigger"}}))
    repo = make_repo(root, {"stages": {"package": {"cmd": "python package.py", "deps": ["data/raw", "package.py"],
                                                   "outs": ["models/packages/toy"]}}})
    dvc_add(repo, "a.txt", "a")
    manifest = repo / "models/packages/toy/manifest.json"

    # never packaged -> runs
    first = run_if_data_changed(repo=repo)
    assert first["changed"] and "no package manifest" in first["reasons"][0]
    assert [(r["stage"], r["ran"]) for r in first["pipeline"]["stages"]] == [("data/raw.dvc", False), ("package", True)]
    assert json.loads(manifest.read_text())["raw_data"]["md5"] == raw_md5(repo)
    assert json.loads(manifest.read_text())["build"]["flow_run_id"] == first["pipeline"]["flow_run_id"]

    # nothing changed -> a cheap recorded "no change" run, no stage task at all
    before = manifest.read_text()
    quiet = run_if_data_changed(repo=repo, return_state=True)
    assert quiet.is_completed()
    result = quiet.result()
    assert (result["changed"], result["pipeline"], result["dvc_status"]) == (False, None, [])
    flow_run_id = str(quiet.state_details.flow_run_id)
    assert task_runs(flow_run_id) == {}
    [artifact] = artifacts(TRIGGER_ARTIFACT_KEY, flow_run_id)
    assert "no change, nothing run" in artifact.data and raw_md5(repo) in artifact.data
    assert manifest.read_text() == before

    # an image added and `dvc add`ed -> the pipeline reruns and repackages
    old_md5 = raw_md5(repo)
    dvc_add(repo, "b.txt", "b")
    assert check_data(repo)["changed"]
    changed = run_if_data_changed(repo=repo)
    assert changed["changed"] and any(old_md5 in r for r in changed["reasons"])
    assert ("package", True) in [(r["stage"], r["ran"]) for r in changed["pipeline"]["stages"]]
    assert json.loads(manifest.read_text())["raw_data"]["md5"] == raw_md5(repo) != old_md5
    assert check_data(repo)["changed"] is False
