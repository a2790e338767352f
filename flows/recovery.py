"""Recover a repo from a killed run before the next stage starts (`recover_workspace`).

What a SIGKILL can leave that nothing else cleans up: a truncated dvc.lock (below), the scratch
temp folder of a killed stage (`lathe.io.scratch_tempdir`) and pid-tagged temp files or package
staging folders beside outputs (`lathe.io.temp_prefix`). A stage's own next start removes the
latter two, but a stage DVC skips (outputs intact) or restores from its cache never starts.

DVC 3 rewrites dvc.lock in place, not through a temporary file and a rename. A run killed in that
moment leaves a truncated file (`hash:` with no value), and every later `dvc repro` then stops at
once with "'dvc.lock' validation failed" until someone restores it by hand (measured: 7 of 75
kills in docs/kill-test.md). Before each stage, the flow calls `guard_lockfile`: a valid dvc.lock
is copied aside; an invalid one is replaced by that copy, so the rerun sees the state from before
the killed stage and DVC reruns (or restores from its cache) just that stage.

Pure DVC + files: no Prefect here, so scripts/kill_test.py reruns the same way the flow does.
Safe to call only while holding the pipeline's concurrency slot (one writer per repo).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LOCK_FILE = "dvc.lock"
# Git-ignored (.lathe/) and outside DVC's own .dvc/tmp; one copy per repo.
LAST_GOOD = Path(".lathe") / "dvc.lock.last-good"


class LockfileBroken(RuntimeError):
    """dvc.lock is unreadable and no earlier good copy exists to put back."""


def recover_workspace(repo: Path) -> list[str]:
    """Repair `repo` after a killed run; returns what was repaired (messages for the run log).

    Raises LockfileBroken when dvc.lock is broken and there is no copy to put back.
    """
    from lathe.io import remove_dead_scratch, remove_dead_temps_under

    done = [f"removed the scratch folder of a killed stage: {path}" for path in remove_dead_scratch(repo)]
    done += [f"removed a temp file of a killed writer: {path}" for path in remove_dead_temps_under(repo)]
    restored = guard_lockfile(repo)
    return done + ([restored] if restored else [])


def lockfile_problem(path: Path) -> str | None:
    """None when `path` passes DVC's own dvc.lock parsing and schema check, else DVC's message."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.strictyaml import load

    try:
        load(str(path), schema=COMPILED_LOCKFILE_SCHEMA)
    except DvcException as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return f"{exc}{cause}".splitlines()[0]
    return None


def guard_lockfile(repo: Path) -> str | None:
    """Keep a copy of a valid `repo`/dvc.lock, or put the copy back over a broken one.

    Returns a message when it restored the copy (for the run log), None otherwise.
    Raises LockfileBroken when dvc.lock is broken and there is no copy to restore.
    """
    lock, copy = repo / LOCK_FILE, repo / LAST_GOOD
    if not lock.is_file():
        return None
    problem = lockfile_problem(lock)
    if problem is None:
        _copy_atomically(lock, copy)
        return None
    if not copy.is_file():
        raise LockfileBroken(f"{lock} is broken ({problem}) and there is no earlier copy at {copy}; "
                             f"restore it with `git checkout {LOCK_FILE}` and rerun")
    _copy_atomically(copy, lock)
    return (f"{lock} was broken ({problem}), most likely by a run killed while DVC wrote it; "
            f"restored the copy taken before the last stage ({copy})")


def _copy_atomically(src: Path, dst: Path) -> None:
    """Copy through a temporary sibling and a rename, so `dst` is never half written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # left by a copy killed half way
        stale.unlink(missing_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
