"""`lathe verify --rebuild`: reproduce a package at its recorded commit in a temporary git worktree
from the DVC cache, and compare it with the one being verified. This module shells out to git and
dvc (the one place in `lathe` besides the CLI that does: a rebuild is a `dvc repro` elsewhere)."""

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

from lathe.audit.verify import MANIFEST, SIGNATURE, VerifyReport, _check_signature, _short, json_diff
from lathe.io import sha256_bytes, sha256_file


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
    env.update({"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "ORT_DISABLE_TELEMETRY": "1", "GX_ANALYTICS_ENABLED": "false",
                "LATHE_SIGNING_KEY": str(signing_key)})
    if flow_run_id:
        env["LATHE_FLOW_RUN_ID"] = str(flow_run_id)
    else:
        env.pop("LATHE_FLOW_RUN_ID", None)
    return env


def _tail(res: subprocess.CompletedProcess, n: int = 15) -> str:
    text = (res.stdout or "") + (res.stderr or "")
    return " | ".join(text.strip().splitlines()[-n:])


def compare_packages(original: Path, rebuilt: Path) -> list[str]:
    """Files (other than `signature`) that differ between two package folders; manifest.json by key path."""
    names = sorted(({p.name for p in original.iterdir()} | {p.name for p in rebuilt.iterdir()}) - {SIGNATURE})
    diffs = []
    for name in names:
        a, b = original / name, rebuilt / name
        if not a.exists():
            diffs.append(f"{name}: only in the rebuilt package")
        elif not b.exists():
            diffs.append(f"{name}: missing from the rebuilt package")
        elif a.read_bytes() != b.read_bytes():
            if name == MANIFEST:
                try:
                    keys = json_diff(json.loads(a.read_text()), json.loads(b.read_text()))
                except json.JSONDecodeError:
                    keys = []
                diffs.append(f"{name}: differs at {', '.join(keys) if keys else 'formatting only'}")
            else:
                diffs.append(f"{name}: sha256 {_short(sha256_file(a))}… vs rebuilt {_short(sha256_file(b))}…")
    return diffs


def compare_archives(original: Path, rebuilt: Path) -> list[str]:
    """Members (other than */signature) that differ between two archives: names, headers or bytes."""
    import tarfile

    def members(path: Path) -> dict[str, tuple]:
        with tarfile.open(path, "r:gz") as tar:
            return {m.name: (m.mode, m.uid, m.gid, m.uname, m.gname, m.mtime, m.type,
                             sha256_bytes(tar.extractfile(m).read()) if m.isreg() else None)
                    for m in tar.getmembers() if not m.name.endswith("/" + SIGNATURE)}

    a, b = members(original), members(rebuilt)
    return [f"archive member {n}: " + ("only in rebuilt" if n not in a else "missing from rebuilt" if n not in b
                                       else "differs (header or content)")
            for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]


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
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _lock_mismatch(lock: dict, manifest: dict) -> str | None:
    """Why this dvc.lock is not the one the package was built with (None when its entries match)."""
    from lathe.ship.contract import canonical_json
    from lathe.ship.lineage import _lock_entry

    stages = lock.get("stages") or {}
    for name, recorded in sorted((manifest.get("stages") or {}).items()):
        if name not in stages:
            return f"no stage {name}"
        try:
            entry = _lock_entry(stages[name])
        except (KeyError, TypeError, AttributeError):
            return f"stage {name} is malformed"
        if canonical_json(entry) != canonical_json(recorded):
            return f"stage {name} differs"
    return None


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
        why = _lock_mismatch(cand.lock, manifest)
        if why is None:
            source = cand
            break
        reasons.append(f"{cand.label}: {why}")
    if source is None:
        looked = "; ".join(reasons) if reasons else f"no dvc.lock at {commit[:12]}, in {repo} or in a later commit"
        report.add("rebuild data", False,
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
        report.add("rebuild data", False, f"{source.label} lists no DVC-tracked input of {stage}")
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
        report.add("rebuild data", False, f"`dvc status {stage}` failed in the worktree at {commit[:12]}: {status_error}")
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
        report.add("rebuild data", False,
                   f"{len(missing)} of {len(needed)} inputs of {stage} cannot be restored at {commit[:12]} "
                   f"(lineage from {source.label}): {listed}. Run `dvc pull` in {repo} (or `dvc repro` to "
                   f"regenerate them) and retry" + (f". dvc said: {checkout_error}" if checkout_error else ""))
        return False
    report.add("rebuild data", True, f"{len(needed)} inputs of {stage} restored from the DVC cache {cache} as "
                                     f"recorded in {source.label}")
    return True


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


def rebuild_and_compare(pkg: Path, manifest: dict, repo: Path, public_key: Path | None, report: VerifyReport,
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
        report.add("rebuild", False, f"{MANIFEST} lacks git.commit or target.name; cannot rebuild")
        return
    flow_run_id = (manifest.get("build") or {}).get("flow_run_id")
    signing_key = Path(signing_key) if signing_key else Path(
        os.environ.get("LATHE_SIGNING_KEY", repo / ".lathe/keys/signing-key.pem"))
    if not signing_key.is_absolute():
        signing_key = repo / signing_key
    env = _env(flow_run_id, signing_key)
    git, dvc = "git", _tool("dvc")
    res = _run([git, "-C", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"], repo, env)
    if res.returncode != 0:
        report.add("rebuild", False, f"commit {commit} is not in the repository {repo}")
        return
    res = _run([dvc, "cache", "dir"], repo, env)
    cache = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else str(repo / ".dvc" / "cache")
    cache = str((repo / cache).resolve())  # absolute as printed; a relative one is the repo's

    tmp = Path(tempfile.mkdtemp(prefix="lathe-rebuild-"))
    wt = tmp / "worktree"
    try:
        res = _run([git, "-C", str(repo), "worktree", "add", "--detach", str(wt), commit], repo, env)
        if res.returncode != 0:
            report.add("rebuild", False, f"git worktree add at {commit[:12]} failed: {_tail(res)}")
            return
        local = repo / ".dvc" / "config.local"  # remotes (and credentials paths) configured locally
        if local.is_file() and (wt / ".dvc").is_dir():
            shutil.copy2(local, wt / ".dvc" / "config.local")
        cmd = [dvc, "cache", "dir", "--local", cache]
        res = _run(cmd, wt, env)
        if res.returncode != 0:
            report.add("rebuild", False, f"`{' '.join(cmd[1:])}` failed: {_tail(res)}")
            return
        stage = f"package@{target}"
        if full:
            tracked = sorted(_tracked_outputs(wt, {}))  # .dvc-tracked data (raw); every stage reruns
            res = _run([dvc, "checkout", *tracked], wt, env) if tracked else None
            if res is not None and res.returncode != 0:
                report.add("rebuild data", False, f"dvc checkout {' '.join(tracked)} at {commit[:12]} failed (not in "
                                                  f"the DVC cache {cache}? run `dvc pull` in {repo}): {_tail(res, 8)}")
                return
            cmd = [dvc, "repro", "--force", stage]
        else:
            if not _restore_inputs(wt, repo, cache, commit, target, manifest, dvc, env, report):
                return
            cmd = [dvc, "repro", "--force", "--single-item", stage]
        res = _run(cmd, wt, env)
        if res.returncode != 0:
            report.add("rebuild", False, f"`dvc {' '.join(cmd[1:])}` failed at {commit[:12]}: {_tail(res)}")
            return
        rebuilt = wt / "models" / "packages" / target
        if not rebuilt.is_dir():
            report.add("rebuild", False, f"`dvc repro {stage}` did not produce models/packages/{target}/")
            return
        diffs = compare_packages(pkg, rebuilt)
        rebuilt_archive = rebuilt.parent / f"{target}.tar.gz"
        if archive is not None and rebuilt_archive.is_file():
            diffs += compare_archives(archive, rebuilt_archive)
        scope = "from raw data" if full else f"{stage} from cached upstream outputs"
        if diffs:
            report.add("rebuild", False, f"rebuilt at {commit[:12]} ({scope}); differs: " + "; ".join(diffs))
        else:
            names = sorted(p.name for p in rebuilt.iterdir() if p.name != SIGNATURE)
            also = " and the archive's members" if archive is not None and rebuilt_archive.is_file() else ""
            report.add("rebuild", True, f"rebuilt at {commit[:12]} ({scope}): all {len(names)} files byte-identical "
                                        f"({', '.join(names)}){also}; signature excluded: ECDSA is randomised")
        _check_signature(rebuilt, public_key, report, name="rebuilt signature")
    except subprocess.TimeoutExpired as exc:
        report.add("rebuild", False, f"timed out: {exc}")
    finally:
        _run([git, "-C", str(repo), "worktree", "remove", "--force", str(wt)], repo, env)
        shutil.rmtree(tmp, ignore_errors=True)
        _run([git, "-C", str(repo), "worktree", "prune"], repo, env)
