"""Packages of earlier commits: the git history of dvc.lock names them, the DVC cache (or a local remote) holds them.

A plant's records hold a sha256 (of a model file or an archive) from a package shipped months ago;
its folder in the working tree has long been rebuilt. Every committed dvc.lock lists the md5 of each
`package@<target>` out (the folder, the archive and its `.sha256`); DVC keeps those bytes in its
cache by md5 (`<cache>/files/md5/<2>/<30>`; a folder is a `.dir` object listing its files). This
module walks that history, newest first, and materialises a matching package into a folder.

The audit code shells out to git and dvc (`dvc cache dir`, `dvc remote list`), as the rebuild does;
the cache objects themselves are read directly, with size limits, and treated as untrusted
until the package they form is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from lathe.io import load_yaml
from lathe.offline import OFFLINE_ENV
from lathe.ship.contract import MANIFEST_FILE, MAX_FILE_BYTES, MODEL_FILE, PACKAGE_FILES

MAX_LOCK_COMMITS = 500  # dvc.lock history walked at most this deep
PACKAGE_STAGE = "package@"


@dataclass(frozen=True)
class PackageRecord:
    """One package out of one dvc.lock: where its bytes live in the DVC stores."""

    commit: str
    target: str
    folder_md5: str | None  # the models/packages/<target> out (".dir")
    archive_md5: str | None
    sidecar_md5: str | None


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def _dvc() -> str:
    cand = Path(sys.executable).parent / "dvc"
    return str(cand) if cand.exists() else "dvc"


def stores(repo: Path) -> list[Path]:
    """The repository's DVC cache, then every remote that is a local folder (same object layout)."""
    out = []
    res = _run([_dvc(), "cache", "dir"], repo)
    cache = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else ".dvc/cache"
    out.append((repo / cache).resolve())
    res = _run([_dvc(), "remote", "list"], repo)
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1]:
            url = Path(parts[1])
            out.append((url if url.is_absolute() else repo / ".dvc" / url).resolve())
    return [s for s in out if s.is_dir()]


def read_object(stores_: list[Path], md5: str, limit: int) -> bytes | None:
    """The bytes of a cached object, from the first store that has it intact (md5 checked), else None."""
    name = md5.removesuffix(".dir")
    for store in stores_:
        path = store / "files" / "md5" / name[:2] / (md5[2:])
        try:
            if not path.is_file() or path.stat().st_size > limit:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if hashlib.md5(data).hexdigest() == name:
            return data
    return None


def lock_history(repo: Path, max_commits: int = MAX_LOCK_COMMITS) -> Iterator[tuple[str, dict]]:
    """(commit, parsed dvc.lock) of every commit that changed dvc.lock, newest first, on any branch.

    One `git cat-file --batch` reads every version; unreadable versions are passed over.
    """
    log = subprocess.run(["git", "-C", str(repo), "log", f"--max-count={max_commits}", "--format=%H", "--all",
                          "--", "dvc.lock"], capture_output=True, text=True)
    commits = log.stdout.split() if log.returncode == 0 else []
    if not commits:
        return
    batch = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch"], capture_output=True,
                           input="".join(f"{c}:dvc.lock\n" for c in commits).encode())
    out, pos = batch.stdout, 0
    for commit in commits:
        end = out.find(b"\n", pos)
        header = out[pos:end].split()
        if end < 0 or len(header) != 3:  # "<object> missing"
            pos = end + 1
            continue
        size = int(header[2])
        blob, pos = out[end + 1:end + 1 + size], end + 1 + size + 1
        try:
            lock = load_yaml(blob)
        except yaml.YAMLError:
            continue
        if isinstance(lock, dict):
            yield commit, lock


def package_records(repo: Path, max_commits: int = MAX_LOCK_COMMITS) -> Iterator[PackageRecord]:
    """Every package out of every committed dvc.lock, newest commit first (each distinct folder once)."""
    seen: set[tuple] = set()
    for commit, lock in lock_history(repo, max_commits):
        stages = lock.get("stages")
        for name, entry in (stages if isinstance(stages, dict) else {}).items():
            if not str(name).startswith(PACKAGE_STAGE) or not isinstance(entry, dict):
                continue
            target = str(name)[len(PACKAGE_STAGE):]
            outs = {str(o.get("path")): o.get("md5") for o in entry.get("outs") or [] if isinstance(o, dict)}
            rec = PackageRecord(commit, target, outs.get(f"models/packages/{target}"),
                                outs.get(f"models/packages/{target}.tar.gz"),
                                outs.get(f"models/packages/{target}.tar.gz.sha256"))
            key = (rec.target, rec.folder_md5, rec.archive_md5)
            if key not in seen:
                seen.add(key)
                yield rec


def folder_files(stores_: list[Path], folder_md5: str) -> dict[str, str] | None:
    """{file name: md5} of a cached package folder (a `.dir` object), or None when not cached."""
    data = read_object(stores_, folder_md5, 1 << 20)
    try:
        listing = json.loads(data) if data is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(listing, list):
        return None
    return {str(e.get("relpath")): str(e.get("md5")) for e in listing if isinstance(e, dict)}


def hashes_of(stores_: list[Path], rec: PackageRecord) -> dict[str, str]:
    """sha256 of what a plant may have recorded: {"archive", "model.onnx", "manifest.json"} (those cached)."""
    out = {}
    side = read_object(stores_, rec.sidecar_md5, 4096) if rec.sidecar_md5 else None
    if side:
        out["archive"] = side.decode("ascii", "replace").split()[0] if side.split() else ""
    files = folder_files(stores_, rec.folder_md5) if rec.folder_md5 else None
    for name in (MODEL_FILE, MANIFEST_FILE):
        data = read_object(stores_, files[name], MAX_FILE_BYTES[name]) if files and name in files else None
        if data is not None:
            out[name] = hashlib.sha256(data).hexdigest()
    return out


def materialise(stores_: list[Path], rec: PackageRecord, dest: Path) -> Path | None:
    """Copy a cached package folder to `dest/<target>` (package files only); None when any is missing."""
    files = folder_files(stores_, rec.folder_md5) if rec.folder_md5 else None
    if not files or set(files) != set(PACKAGE_FILES):
        return None
    pkg = dest / rec.target
    pkg.mkdir(parents=True)
    for name, md5 in files.items():
        data = read_object(stores_, md5, MAX_FILE_BYTES[name])
        if data is None:
            return None
        (pkg / name).write_bytes(data)
    return pkg
