"""`lathe verify --rebuild`, the workspace: reproduce a package at its recorded commit in a temporary git
worktree from the DVC cache - find the dvc.lock it was built from, restore its inputs, `dvc repro` its
package stage - then report how the rebuild compares (lathe.audit.rebuild_report, rebuild_compare).

This is the one place in `lathe/` allowed to shell out to git and dvc to make something: it adds and
removes a git worktree and runs `dvc checkout`, `dvc pull` and `dvc repro` in it. Elsewhere they are
only queried, read-only (git log/show/status/rev-parse; `dvc cache dir`, `dvc remote list`, `dvc status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.audit.rebuild_report import report_rebuild
from lathe.audit.report import VerifyReport
from lathe.audit.trust import Trust, rebuild_key_trust
from lathe.determinism import REQUIRED_CPU_FLAGS, cpu_model, machine_can_honour_pins
from lathe.offline import OFFLINE_ENV
from lathe.ship.build import ENV_FLOW_RUN
from lathe.ship.contract import MANIFEST_FILE
from lathe.ship.lineage import lock_mismatch
from lathe.ship.signing import DEFAULT_PRIVATE_KEY, ENV_SIGNING_KEY, signing_key_path

# ---------------------------------------------------------------------------------------------
# rebuild


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    """Prefer the tool installed beside this interpreter (the project venv)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _env(flow_run_id: str | None, signing_key: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({**OFFLINE_ENV, ENV_SIGNING_KEY: str(signing_key)})
    if flow_run_id:
        env[ENV_FLOW_RUN] = str(flow_run_id)
    else:
        env.pop(ENV_FLOW_RUN, None)
    return env


def _tail(res: subprocess.CompletedProcess, n: int = 15) -> str:
    text = (res.stdout or "") + (res.stderr or "")
    return " | ".join(text.strip().splitlines()[-n:])


# The package's commit need not hold the dvc.lock (or the uncached metrics) the package was built
# with: the package stage runs inside `dvc repro`, which rewrites dvc.lock and the metrics without
# making the tree dirty, and they are usually committed *after* the run. So the rebuild looks for the
# dvc.lock whose entries equal the lineage the manifest recorded (`stages`), in this order: the
# commit's own, the repository's working copy, then later commits that changed dvc.lock.


@dataclass
class _LockSource:
    """A dvc.lock candidate and where the files of the same state (uncached outputs) can be read."""

    label: str
    lock: dict
    text: str
    read: Any  # Callable[[str], bytes | None]: a file of that state by repo-relative path


def _md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _read_path(root: Path):
    def read(rel: str) -> bytes | None:
        p = root / rel
        return p.read_bytes() if p.is_file() else None
    return read


def _read_blob(repo: Path, commit: str, env: dict[str, str]):
    def read(rel: str) -> bytes | None:
        res = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{rel}"], env=env, capture_output=True)
        return res.stdout if res.returncode == 0 else None
    return read


def _load_lock(text: str) -> dict | None:
    import yaml

    try:
        lock = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return lock if isinstance(lock, dict) and isinstance(lock.get("stages"), dict) else None


def _lock_candidates(repo: Path, wt: Path, commit: str, env: dict[str, str]) -> tuple[list[_LockSource], list]:
    """dvc.lock states that may be the package's: the commit's, the repo's working copy, later commits';
    and every state's file reader (for uncached outputs, duplicates of a dvc.lock included)."""
    found: list[_LockSource] = []
    readers: list = []
    seen: set[str] = set()

    def add(label: str, text: str | None, read) -> None:
        readers.append(read)
        if text is None or text in seen:
            return
        seen.add(text)
        lock = _load_lock(text)
        if lock is not None:
            found.append(_LockSource(label, lock, text, read))

    own = wt / "dvc.lock"
    add(f"dvc.lock at {commit[:12]} (the package's commit)", own.read_text() if own.is_file() else None,
        _read_path(wt))
    work = repo / "dvc.lock"
    add(f"the working dvc.lock of {repo}", work.read_text() if work.is_file() else None, _read_path(repo))
    res = _run(["git", "-C", str(repo), "rev-list", "--reverse", "--ancestry-path", "--all", f"^{commit}",
                "--", "dvc.lock"], repo, env)
    for later in (res.stdout.split() if res.returncode == 0 else [])[:200]:
        blob = _read_blob(repo, later, env)("dvc.lock")
        add(f"dvc.lock at {later[:12]} (a later commit)", blob.decode("utf-8", "replace") if blob else None,
            _read_blob(repo, later, env))
    return found, readers


def _tracked_outputs(wt: Path, lock: dict) -> dict[str, str]:
    """Every DVC-tracked path of the worktree (stage outs in `lock`, `.dvc` files) -> its md5."""
    import yaml

    out: dict[str, str] = {}
    for dvcfile in sorted(wt.rglob("*.dvc")):
        if ".dvc" in dvcfile.relative_to(wt).parts[:-1] or not dvcfile.is_file():
            continue
        try:
            outs = (yaml.safe_load(dvcfile.read_text()) or {}).get("outs") or []
        except yaml.YAMLError:
            continue
        for o in outs:
            if isinstance(o, dict) and o.get("path") and o.get("md5"):
                rel = (dvcfile.parent / o["path"]).relative_to(wt).as_posix()
                out[rel] = str(o["md5"])
    for entry in (lock.get("stages") or {}).values():
        for o in (entry or {}).get("outs") or []:
            if o.get("path") and o.get("md5"):
                out[o["path"]] = str(o["md5"])
    return out


def _changed_deps(wt: Path, dvc: str, stage: str, env: dict[str, str]) -> tuple[dict[str, str] | None, str]:
    """`dvc status` of the package stage: its deps that differ from dvc.lock (None when status failed)."""
    res = _run([dvc, "status", "--json", stage], wt, env)
    if res.returncode != 0:
        return None, _tail(res)
    try:
        status = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return None, res.stdout.strip()[-500:]
    changed: dict[str, str] = {}
    for item in status.get(stage) or []:
        if isinstance(item, dict):
            changed.update(item.get("changed deps") or {})
    return changed, ""


def _restore_inputs(wt: Path, repo: Path, cache: str, commit: str, target: str, manifest: dict, dvc: str,
                    env: dict[str, str], report: VerifyReport) -> bool:
    """Put dvc.lock and every input of package@<target> in the worktree as the package was built with."""
    stage = f"package@{target}"
    candidates, readers = _lock_candidates(repo, wt, commit, env)
    reasons, source = [], None
    for cand in candidates:
        why = lock_mismatch(cand.lock, manifest.get("stages") or {})
        if why is None:
            source = cand
            break
        reasons.append(f"{cand.label}: {why}")
    if source is None:
        looked = "; ".join(reasons) if reasons else f"no dvc.lock at {commit[:12]}, in {repo} or in a later commit"
        report.add("rebuild data", "FAIL",
                   f"no dvc.lock records the stages this package was built from ({', '.join(manifest.get('stages') or {})}), "
                   f"so its inputs cannot be restored: {looked}. Commit dvc.lock and the metrics after the run "
                   f"that built the package (`git add dvc.lock reports && git commit`), or verify in the "
                   f"repository that built it")
        return False
    lock = source.lock
    if not (wt / "dvc.lock").is_file() or (wt / "dvc.lock").read_text() != source.text:
        (wt / "dvc.lock").write_text(source.text)

    tracked = _tracked_outputs(wt, lock)
    entry = (lock.get("stages") or {}).get(stage)
    if entry:
        needed = {d["path"]: str(d.get("md5", "")) for d in entry.get("deps") or [] if d.get("path") in tracked}
    else:  # the lock predates this target: restore every upstream output it records
        needed = {p: m for p, m in tracked.items() if not p.startswith("models/packages/")}
    if not needed:
        report.add("rebuild data", "FAIL", f"{source.label} lists no DVC-tracked input of {stage}")
        return False

    # cached outputs (and .dvc-tracked data) from the repo's cache; any error is kept for the message
    res = _run([dvc, "checkout", *sorted(needed)], wt, env)
    checkout_error = "" if res.returncode == 0 else _tail(res, 8)
    # uncached outputs (metrics with cache: false) live in git or the repo's working tree
    for rel, md5 in sorted(needed.items()):
        path = wt / rel
        if md5.endswith(".dir") or (path.is_file() and _md5_file(path) == md5):
            continue
        for read in [source.read, *readers]:
            data = read(rel)
            if data is not None and hashlib.md5(data).hexdigest() == md5:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                break

    changed, status_error = _changed_deps(wt, dvc, stage, env) if entry else ({}, "")
    if changed is None:
        report.add("rebuild data", "FAIL", f"`dvc status {stage}` failed in the worktree at {commit[:12]}: {status_error}")
        return False
    missing = {p: ("deleted" if not (wt / p).exists() else changed.get(p, "modified"))
               for p in needed if p in changed or not (wt / p).exists()}
    if missing and _run([dvc, "remote", "list"], wt, env).stdout.strip():
        pulled = _run([dvc, "pull", *sorted(missing)], wt, env)
        if pulled.returncode != 0:
            checkout_error = (checkout_error + " / " if checkout_error else "") + "dvc pull: " + _tail(pulled, 8)
        changed, _ = _changed_deps(wt, dvc, stage, env) if entry else ({}, "")
        changed = changed or {}
        missing = {p: ("deleted" if not (wt / p).exists() else changed.get(p, "modified"))
                   for p in needed if p in changed or not (wt / p).exists()}
    if missing:
        listed = "; ".join(f"{p} ({state}, md5 {needed[p]}: {_where(cache, needed[p])})"
                           for p, state in sorted(missing.items()))
        report.add("rebuild data", "FAIL",
                   f"{len(missing)} of {len(needed)} inputs of {stage} cannot be restored at {commit[:12]} "
                   f"(lineage from {source.label}): {listed}. Run `dvc pull` in {repo} (or `dvc repro` to "
                   f"regenerate them) and retry" + (f". dvc said: {checkout_error}" if checkout_error else ""))
        return False
    report.add("rebuild data", "PASS", f"{len(needed)} inputs of {stage} restored from the DVC cache {cache} as "
                                     f"recorded in {source.label}")
    return True


def _stages_run(dvc_output: str) -> list[str]:
    """Stage names `dvc repro` ran, from its "Running stage 'x':" lines, in order."""
    import re

    return re.findall(r"Running stage '([^']+)'", dvc_output or "")


def _where(cache: str, md5: str) -> str:
    """Why an input with this md5 could not be restored, as far as the cache tells."""
    name = md5.removesuffix(".dir")
    for obj in (Path(cache) / "files" / "md5" / name[:2] / (md5[2:]), Path(cache) / name[:2] / md5[2:]):
        if obj.is_file():
            return (f"in the DVC cache {cache} but some of its files are not" if md5.endswith(".dir")
                    else f"in the DVC cache {cache} but the checkout failed")
    if md5.endswith(".dir"):
        return f"not in the DVC cache {cache}"
    return f"not in the DVC cache {cache}, nor with this md5 in git or the repository's working tree"


def rebuild_and_compare(pkg: Path, manifest: dict, repo: Path, trust: Trust, report: VerifyReport,
                        signing_key: Path | None = None, full: bool = False, archive: Path | None = None) -> None:
    """Reproduce the package at its recorded commit in a temporary git worktree and compare it.

    The worktree uses the repo's DVC cache (`dvc cache dir --local`). By default the dvc.lock the
    package was built with is found (see `_lock_candidates`), every input of `package@<target>` is
    restored from the cache (uncached metrics from git or the repo's working tree; `dvc pull` is
    tried when a remote is set) and only `package@<target>` is rerun (forced); `full` restores the
    raw data only and forces every stage. The worktree is removed afterwards whatever happens.
    """
    repo = Path(repo).resolve()
    commit = (manifest.get("git") or {}).get("commit")
    target = (manifest.get("target") or {}).get("name")
    if not commit or not target:
        report.add("rebuild", "FAIL", f"{MANIFEST_FILE} lacks git.commit or target.name; cannot rebuild")
        return
    flow_run_id = (manifest.get("build") or {}).get("flow_run_id")
    # an explicit key wins; else the package stage's own rule (env, then the default key of the repo)
    signing_key = repo / signing_key if signing_key else signing_key_path(DEFAULT_PRIVATE_KEY, repo)
    env = _env(flow_run_id, signing_key)
    pinned = machine_can_honour_pins()
    if not pinned:  # said before the (long) rebuild starts
        report.add("rebuild platform", "INFO", f"this machine ({cpu_model()}) cannot run the pinned kernels "
                                               f"(x86-64 with {' and '.join(REQUIRED_CPU_FLAGS).upper()} needed): "
                                               f"the rebuild can be equivalent, not byte-identical")
    git, dvc = "git", _tool("dvc")
    res = _run([git, "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], repo, env)
    if res.returncode != 0:
        report.add("rebuild", "FAIL", f"commit {commit} is not in the repository {repo}")
        return
    res = _run([dvc, "cache", "dir"], repo, env)
    cache = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else str(repo / ".dvc" / "cache")
    cache = str((repo / cache).resolve())  # absolute as printed; a relative one is the repo's

    tmp = Path(tempfile.mkdtemp(prefix="lathe-rebuild-"))
    wt = tmp / "worktree"
    try:
        res = _run([git, "-C", str(repo), "worktree", "add", "--detach", str(wt), commit], repo, env)
        if res.returncode != 0:
            report.add("rebuild", "FAIL", f"git worktree add at {commit[:12]} failed: {_tail(res)}")
            return
        local = repo / ".dvc" / "config.local"  # remotes (and credentials paths) configured locally
        if local.is_file() and (wt / ".dvc").is_dir():
            shutil.copy2(local, wt / ".dvc" / "config.local")
        cmd = [dvc, "cache", "dir", "--local", cache]
        res = _run(cmd, wt, env)
        if res.returncode != 0:
            report.add("rebuild", "FAIL", f"`{' '.join(cmd[1:])}` failed: {_tail(res)}")
            return
        stage = f"package@{target}"
        if full:
            tracked = sorted(_tracked_outputs(wt, {}))  # .dvc-tracked data (raw); every stage reruns
            checkout = _run([dvc, "checkout", *tracked], wt, env) if tracked else None
            if checkout is not None and checkout.returncode != 0:
                report.add("rebuild data", "FAIL", f"dvc checkout {' '.join(tracked)} at {commit[:12]} failed (not in "
                                                  f"the DVC cache {cache}? run `dvc pull` in {repo}): {_tail(checkout, 8)}")
                return
            cmd = [dvc, "repro", "--force", stage]
        else:
            if not _restore_inputs(wt, repo, cache, commit, target, manifest, dvc, env, report):
                return
            cmd = [dvc, "repro", "--force", "--single-item", stage]
        res = _run(cmd, wt, env)
        if res.returncode != 0:
            report.add("rebuild", "FAIL", f"`dvc {' '.join(cmd[1:])}` failed at {commit[:12]}: {_tail(res)}")
            return
        rebuilt = wt / "models" / "packages" / target
        if not rebuilt.is_dir():
            report.add("rebuild", "FAIL", f"`dvc repro {stage}` did not produce models/packages/{target}/")
            return
        ran = _stages_run(res.stdout)
        scope = (f"every stage from raw data ({len(ran)} run: {', '.join(ran)})" if full
                 else f"only {stage}, from the upstream outputs restored from the DVC cache")
        rebuilt_archive = rebuilt.parent / f"{target}.tar.gz"
        rebuild_trust = rebuild_key_trust(signing_key, tmp, trust)
        report_rebuild(pkg, archive, rebuilt, rebuilt_archive, commit, scope, pinned, rebuild_trust, report)
    except subprocess.TimeoutExpired as exc:
        report.add("rebuild", "FAIL", f"timed out: {exc}")
    finally:
        _run([git, "-C", str(repo), "worktree", "remove", "--force", str(wt)], repo, env)
        shutil.rmtree(tmp, ignore_errors=True)
        _run([git, "-C", str(repo), "worktree", "prune"], repo, env)
