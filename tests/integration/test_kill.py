"""SIGKILL inside every stage, rerun as the flow does: artifacts byte-identical to an uninterrupted
run's, no temporary files left (scripts/kill_test.py, one seeded kill per stage; docs/kill-test.md).

Kills happen in a copy of the fully built tiny workspace with the stage forced (--mode built), so
the rerun redoes only what the kill touched; `python scripts/kill_test.py` runs the "built up to
the previous stage" version and several kills per stage.
"""

from __future__ import annotations

import json
import shutil

import pytest

from scripts.kill_test import run

pytestmark = [pytest.mark.slow, pytest.mark.kill]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_reference: dict) -> dict:
    workdir = tmp_path_factory.mktemp("kill")
    try:
        return run(None, per_stage=1, seed=0, mode="built", workdir=workdir, log=lambda *_: None, ref=tiny_reference,
                   jobs=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def failing(report: dict, problem) -> dict[str, str]:
    """{stage: what went wrong} for the kills where `problem(record)` is truthy."""
    def summary(k: dict) -> str:
        brief = {"problems": k["problems"], "after_kill_leftovers": k["after_kill_leftovers"], "kill": k["kill"],
                 "rerun": {key: v for key, v in k["rerun"].items() if key != "output_tail"}}
        return json.dumps(brief, indent=1)[:2500] + k["rerun"].get("output_tail", "")[-800:]
    return {k["stage"]: summary(k) for k in report["kills"] if problem(k)}


def test_every_stage_was_killed_inside_its_run(report):
    assert len(report["kills"]) >= 20, sorted(report["summary"])  # every dvc.yaml stage and foreach item
    # seeded delays inside the measured run time (redrawn once if the stage beat the reference)
    assert failing(report, lambda k: not (k["kill"]["announced"] and k["kill"]["killed"])) == {}
    assert failing(report, lambda k: k["kill"]["group_survivors"]) == {}


def test_the_rerun_succeeds_and_gives_the_uninterrupted_artifacts(report):
    assert failing(report, lambda k: k["rerun"]["returncode"] != 0) == {}
    assert failing(report, lambda k: [p for p in k["problems"] if not p.startswith("leftover")]) == {}


def test_no_temporary_files_are_left_in_the_workspace_or_tmpdir(report):
    assert failing(report, lambda k: [p for p in k["problems"] if p.startswith("leftover")]) == {}
