"""SIGKILL inside every stage, rerun as the flow does: artifacts byte-identical to an uninterrupted
run's, no temporary files left (scripts/kill_test.py, one seeded kill per stage; docs/kill-test.md).

Kills happen in a copy of the fully built tiny workspace with the stage forced (--mode built), so
the rerun redoes only what the kill touched. `make test` kills every dvc.yaml stage once, a foreach
stage through its first item (the other items run the same code on other inputs; killing all 26
items took 7 of the suite's 20 minutes); `make killtest` (`python scripts/kill_test.py`) kills every
item, several times each, and also runs the "built up to the previous stage" version.
"""

from __future__ import annotations

import json
import shutil

import pytest

from scripts.kill_test import run, stage_list

pytestmark = [pytest.mark.slow, pytest.mark.kill]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_reference: dict) -> dict:
    workdir = tmp_path_factory.mktemp("kill")
    try:
        return run(first_of_each_stage(stage_list(tiny_reference["ws"])), per_stage=1, seed=0, mode="built",
                   workdir=workdir, log=lambda *_: None, ref=tiny_reference, jobs=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def first_of_each_stage(order: list[str]) -> list[str]:
    """Every stage of `dvc stage list`; of a foreach stage (name@item) its first item only."""
    chosen, seen = [], set()
    for stage in order:
        name = stage.split("@")[0]
        if name not in seen:
            seen.add(name)
            chosen.append(stage)
    return chosen


def failing(report: dict, problem) -> dict[str, str]:
    """{stage: what went wrong} for the kills where `problem(record)` is truthy."""
    def summary(k: dict) -> str:
        brief = {"problems": k["problems"], "after_kill_leftovers": k["after_kill_leftovers"], "kill": k["kill"],
                 "rerun": {key: v for key, v in k["rerun"].items() if key != "output_tail"}}
        return json.dumps(brief, indent=1)[:2500] + k["rerun"].get("output_tail", "")[-800:]
    return {k["stage"]: summary(k) for k in report["kills"] if problem(k)}


def test_every_stage_was_killed_inside_its_run(report, tiny_reference):
    stages = {s.split("@")[0] for s in stage_list(tiny_reference["ws"])}
    assert {k["stage"].split("@")[0] for k in report["kills"]} == stages, sorted(report["summary"])
    assert len(stages) >= 12  # ingest ... package: every dvc.yaml stage
    # seeded delays inside the measured run time (redrawn once if the stage beat the reference)
    assert failing(report, lambda k: not (k["kill"]["announced"] and k["kill"]["killed"])) == {}
    assert failing(report, lambda k: k["kill"]["group_survivors"]) == {}


def test_the_rerun_succeeds_and_gives_the_uninterrupted_artifacts(report):
    assert failing(report, lambda k: k["rerun"]["returncode"] != 0) == {}
    assert failing(report, lambda k: [p for p in k["problems"] if not p.startswith("leftover")]) == {}


def test_no_temporary_files_are_left_in_the_workspace_or_tmpdir(report):
    assert failing(report, lambda k: [p for p in k["problems"] if p.startswith("leftover")]) == {}
