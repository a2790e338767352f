"""Recover a repo from a killed run before the next stage starts (`recover_workspace`).

What a SIGKILL can leave that nothing else cleans up: a truncated dvc.lock (below), the scratch
temp folder of a killed stage (`lathe.io.scratch_tempdir`), pid-tagged temp files or package
staging folders beside outputs (`lathe.io.temp_prefix`), and DVC's own partial files. A stage's
next start removes the scratch folders and pid-tagged temps too, but a stage that DVC skips
(outputs intact) or restores from its cache never starts.

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
import re
from pathlib import Path

from lathe.io import write_bytes

LOCK_FILE = "dvc.lock"
# Git-ignored (.lathe/) and outside DVC's own .dvc/tmp; one copy per repo.
LAST_GOOD = Path(".lathe") / "dvc.lock.last-good"


# dvc_objects.fs.utils.tmp_fname: "<prefix>.<secrets.token_urlsafe(16)>.tmp", DVC's partial files
_DVC_TEMP = re.compile(r"\.[A-Za-z0-9_-]{22}\.tmp$")


class LockfileBroken(RuntimeError):
    """dvc.lock is unreadable and no earlier good copy exists to put back."""


def recover_workspace(repo: Path) -> list[str]:
    """Repair `repo` after a killed run; returns what was repaired (messages for the run log).

    Raises LockfileBroken when dvc.lock is broken and there is no copy to put back.
    """
    from lathe.io import remove_dead_scratch, remove_dead_temps_under

    done = [f"removed the scratch folder of a killed stage: {_shown(repo, p)}" for p in remove_dead_scratch(repo)]
    done += [f"removed a temp file of a killed writer: {_shown(repo, p)}" for p in remove_dead_temps_under(repo)]
    done += [f"removed a partial file of a killed DVC: {_shown(repo, p)}" for p in remove_dvc_temps(repo)]
    repaired = [message for message in (repair_rwlock(repo), guard_lockfile(repo)) if message]
    return done + repaired


def _shown(repo: Path, path: Path) -> str:
    """`path` relative to the repo (messages land in run logs and reports: no build-machine paths)."""
    try:
        return Path(path).relative_to(repo).as_posix()
    except ValueError:
        return Path(path).as_posix()


def repair_rwlock(repo: Path) -> str | None:
    """Remove `.dvc/tmp/rwlock` when it is not valid JSON; returns a message when it did.

    DVC records which paths running commands read and write in that JSON file and, like dvc.lock,
    rewrites it in place: a kill mid-write leaves it empty or cut, and every later DVC command stops
    with "Unable to read RWLock-file ... JSON structure is corrupted". A missing file means "no
    locks", which is the truth once the writer is dead. Done under DVC's own `rwlock.lock`, as DVC
    edits the file, so a live DVC command never loses an entry it is writing.
    """
    import json

    from dvc.exceptions import DvcException
    from dvc.lock import make_lock

    tmp_dir = repo / ".dvc" / "tmp"
    path = tmp_dir / "rwlock"
    if not path.is_file():
        return None
    try:
        with make_lock(str(tmp_dir / "rwlock.lock"), tmp_dir=str(tmp_dir)):
            try:
                json.loads(path.read_text(encoding="utf-8"))
                return None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                path.unlink()
                return (f"removed {_shown(repo, path)}: not valid JSON ({exc}), most likely left by a DVC command "
                        "killed while it wrote the file; no DVC command is running, so no lock is lost")
    except DvcException:  # rwlock.lock held: a DVC command is editing it right now
        return None


def is_dvc_temp(path: Path) -> bool:
    """Whether `path` is a partial file named by DVC's tmp_fname."""
    return path.is_file() and bool(_DVC_TEMP.search(path.name))


def remove_dvc_temps(repo: Path) -> list[Path]:
    """Remove DVC's own partial files (`<prefix>.<22 chars>.tmp`) that a killed `dvc repro` left
    beside its outputs or in `.dvc/cache`; returns them. DVC names them without a pid, so this holds
    DVC's repo lock meanwhile: no live DVC process in this repo can be writing one. When another DVC
    command holds the lock, nothing is removed (the next run tries again)."""
    from dvc.exceptions import DvcException
    from dvc.lock import make_lock

    from lathe.io import remove_under

    tmp_dir = repo / ".dvc" / "tmp"
    if not tmp_dir.is_dir():
        return []
    try:
        with make_lock(str(tmp_dir / "lock"), tmp_dir=str(tmp_dir)):
            return remove_under(repo, is_dvc_temp) + remove_under(repo / ".dvc" / "cache", is_dvc_temp)
    except DvcException:  # LockError: a DVC command is running here
        return []


def lockfile_problem(path: Path) -> str | None:
    """None when `path` passes DVC's own dvc.lock parsing and schema check, else DVC's message."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.strictyaml import load

    try:
        load(str(path), schema=COMPILED_LOCKFILE_SCHEMA)
    except DvcException as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        text = f"{exc}{cause}".splitlines()[0]
        for shown in (os.path.relpath(path), str(path)):  # DVC names the file relative to the cwd
            text = text.replace(shown, Path(path).name)
        return text
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
        write_bytes(copy, lock.read_bytes())
        return None
    if not copy.is_file():
        raise LockfileBroken(f"{lock} is broken ({problem}) and there is no earlier copy at {copy}; "
                             f"restore it with `git checkout {LOCK_FILE}` and rerun")
    write_bytes(lock, copy.read_bytes())  # atomic, pid-tagged temp (lathe.io)
    return (f"{LOCK_FILE} was broken ({problem}), most likely by a run killed while DVC wrote it; "
            f"restored the copy taken before the last stage ({_shown(repo, copy)})")
