"""SIGKILL inside a stage, rerun `dvc repro`: artifacts byte-identical to an uninterrupted run's, no
temporary files left (scripts/kill_test.py; one seeded kill per stage for a representative subset).

The subset covers each way a stage writes: ingest (a folder of lathe.io atomic writes), train_teacher
(torch training + ONNX export through a TemporaryDirectory, plus a `cache: false` plot CSV beside
the folder), quantize@student (onnxruntime temp folders), package@tiny-gw (`persist` outs, staging
folder swapped in with renames). Kills happen in a copy of the fully built workspace with the stage
forced (--mode built), so the rerun redoes only what the kill touched; `python scripts/kill_test.py`
runs the full "built up to the previous stage" version for every stage.
"""

from __future__ import annotations

import json
import shutil

import pytest

from scripts.kill_test import run

# Opt-in (`make killtest`), not part of `make test`: it fails today on the known defects below and,
# in about 1 kill in 11, on DVC rewriting dvc.lock in place (a kill mid-write truncates it).
pytestmark = [pytest.mark.slow, pytest.mark.kill]

SUBSET = ["ingest", "train_teacher", "quantize@student", "package@tiny-gw"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("kill")
    try:
        return run(SUBSET, per_stage=1, seed=0, mode="built", workdir=workdir, log=lambda *_: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _record(report: dict, stage: str) -> tuple[dict, str]:
    (rec,) = [k for k in report["kills"] if k["stage"] == stage]
    return rec, json.dumps(rec, indent=1)[:4000]


@pytest.mark.parametrize("stage", SUBSET)
def test_kill_then_rerun_gives_the_uninterrupted_artifacts(report, stage):
    rec, detail = _record(report, stage)
    assert rec["kill"]["announced"], f"DVC never started {stage}\n{detail}"
    assert not rec["kill"]["group_survivors"], detail
    assert rec["rerun"]["returncode"] == 0, f"rerun failed after the kill (stale lock?)\n{detail}"
    artifact_problems = [p for p in rec["problems"] if not p.startswith(("leftover after rerun", "leftover from"))]
    assert artifact_problems == [], detail


# Known defects (docs/kill-test.md), expected to fail until fixed: the package stage's staging folder
# models/packages/.<target>.build-* survives a kill inside the build (lathe/package.py); TemporaryDirectory
# users (lathe/export.py via torch export, lathe/quantize.py, onnxruntime's quant_pre_process) leave their
# folders in TMPDIR.


@pytest.mark.parametrize("stage", SUBSET)
def test_no_temporary_files_left_in_the_workspace(report, stage):
    rec, detail = _record(report, stage)
    assert [p for p in rec["problems"] if p.startswith("leftover after rerun")] == [], detail


@pytest.mark.parametrize("stage", SUBSET)
def test_no_temporary_files_left_in_tmpdir(report, stage):
    rec, detail = _record(report, stage)
    assert [p for p in rec["problems"] if p.startswith("leftover from the kill")] == [], detail


def test_every_kill_landed_inside_its_stage(report):
    # seeded delays inside the measured run time (redrawn once if the stage beat the reference);
    # a stage that finished first would prove nothing
    not_killed = [k["stage"] for k in report["kills"] if not k["kill"]["killed"]]
    assert not not_killed, not_killed
