"""flows/recovery.py: a dvc.lock truncated by a kill (as DVC 3 leaves it) is put back from the copy
taken before the last stage, and a killed stage's scratch folder is removed, so the next flow run
recovers without anyone touching the repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.artifacts import FAILURE_ARTIFACT_KEY
from flows.env import subprocess_env
from flows.pipeline import run_pipeline
from flows.recovery import (
    LAST_GOOD,
    LockfileBroken,
    guard_lockfile,
    lockfile_problem,
    recover_workspace,
    remove_dvc_temps,
)
from tests.flows.test_pipeline_flow import artifacts, make_repo, toy_stages
from tests.lathe.test_io import killed_stage_scratch


def truncate_inside_c(lock: Path) -> None:
    """Cut dvc.lock just after stage c's first `hash:` key, value lost: what a kill mid-write left
    in the kill test (docs/kill-test.md, finding 0)."""
    text = lock.read_text()
    start = text.index("\n  c:\n")
    cut = text.index("hash: ", start) + len("hash:")
    lock.write_text(text[:cut] + "\n")


def dvc_repro(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=subprocess_env(),
                          capture_output=True, text=True)


def built_toy_repo(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "repo", {"stages": toy_stages()})
    assert dvc_repro(repo).returncode == 0
    return repo


def test_lockfile_problem_uses_dvcs_own_schema(tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)
    lock = repo / "dvc.lock"
    assert lockfile_problem(lock) is None

    truncate_inside_c(lock)

    problem = lockfile_problem(lock)
    assert problem is not None and "dvc.lock" in problem and "validation failed" in problem
    assert "validation failed" in dvc_repro(repo).stderr  # what DVC itself says: every repro stops


def test_guard_keeps_a_copy_and_restores_it_over_a_truncated_lock(tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)
    good = (repo / "dvc.lock").read_text()

    assert guard_lockfile(repo) is None
    assert (repo / LAST_GOOD).read_text() == good
    truncate_inside_c(repo / "dvc.lock")

    message = guard_lockfile(repo)

    assert message is not None and "dvc.lock was broken" in message and str(LAST_GOOD) in message
    assert (repo / "dvc.lock").read_text() == good
    assert not list(repo.glob(".dvc.lock.*.tmp")) and not list((repo / ".lathe").glob("*.tmp"))
    assert dvc_repro(repo).returncode == 0


def test_guard_without_a_copy_says_how_to_recover(tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)
    truncate_inside_c(repo / "dvc.lock")

    with pytest.raises(LockfileBroken, match=r"dvc\.lock is broken .*git checkout dvc\.lock"):
        guard_lockfile(repo)


def test_recover_workspace_removes_a_killed_stages_scratch_and_repairs_the_lock(tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)
    guard_lockfile(repo)
    truncate_inside_c(repo / "dvc.lock")
    scratch = killed_stage_scratch(repo)

    repaired = recover_workspace(repo)

    assert not scratch.exists()
    assert len(repaired) == 2
    assert repaired[0] == f"removed the scratch folder of a killed stage: {scratch.relative_to(repo).as_posix()}"
    assert repaired[1].startswith("dvc.lock was broken (") and "validation failed" in repaired[1]
    assert not any(str(tmp_path) in message for message in repaired), repaired  # logs and reports: no machine paths
    assert lockfile_problem(repo / "dvc.lock") is None
    assert recover_workspace(repo) == []  # nothing left to do


def test_dvcs_own_partial_files_are_removed_only_while_no_dvc_command_runs(tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)
    # what a kill during DVC's save/checkout left (dvc_objects tmp_fname): beside an out, in the cache
    beside = repo / ".oCipurQfx6Xd3uETbxS_mA.tmp"
    cached = repo / ".dvc" / "cache" / "files" / "md5" / ".Al3V3sSqv2q1FNllRbFK0A.tmp"
    for path in (beside, cached):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    ours = repo / ".c.txt.123.abcdefgh.tmp"  # not DVC's name: left alone here
    ours.write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", (  # another DVC command holding the repo lock
        "import sys, time; from dvc.lock import make_lock\n"
        "with make_lock('.dvc/tmp/lock', tmp_dir='.dvc/tmp'):\n"
        "    print('held', flush=True); time.sleep(60)")],
        cwd=repo, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_dvc_temps(repo) == [] and beside.exists() and cached.exists()
    finally:
        holder.kill()
        holder.wait()

    assert sorted(remove_dvc_temps(repo)) == sorted([beside, cached])

    assert not beside.exists() and not cached.exists() and ours.exists()


@pytest.mark.parametrize("content", ["", '{"read": {"a.txt": [{"pid": 1'])
def test_a_rwlock_a_kill_left_unreadable_is_removed_and_dvc_runs_again(tmp_path: Path, content: str) -> None:
    repo = built_toy_repo(tmp_path)
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    rwlock.write_text(content)  # what a kill while DVC rewrote it left (make killtest: once in 75 kills)
    assert "JSON structure is corrupted" in dvc_repro(repo).stderr

    repaired = recover_workspace(repo)

    assert len(repaired) == 1 and repaired[0].startswith("removed .dvc/tmp/rwlock: not valid JSON")
    assert not rwlock.exists()
    assert dvc_repro(repo).returncode == 0
    assert recover_workspace(repo) == []  # a valid rwlock (DVC wrote it again) is left alone


def test_a_flow_run_recovers_from_a_lock_a_killed_run_truncated(prefect_server: None, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"stages": toy_stages()})
    assert run_pipeline(repo=repo, return_state=True).is_completed()  # leaves the copy
    truncate_inside_c(repo / "dvc.lock")

    state = run_pipeline(repo=repo, return_state=True)

    assert state.is_completed(), state.message
    assert (repo / "c.txt").read_text() == "abc"
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, env=subprocess_env(),
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout


def test_a_flow_run_with_a_broken_lock_and_no_copy_fails_naming_the_file(prefect_server: None, tmp_path: Path) -> None:
    repo = built_toy_repo(tmp_path)  # built by plain dvc: no copy yet
    truncate_inside_c(repo / "dvc.lock")

    state = run_pipeline(repo=repo, return_state=True)

    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, LockfileBroken)
    assert "dvc.lock is broken" in str(exc) and "git checkout dvc.lock" in str(exc)
    [artifact] = artifacts(FAILURE_ARTIFACT_KEY, str(state.state_details.flow_run_id))
    assert "git checkout dvc.lock" in artifact.data
