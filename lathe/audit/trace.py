"""`lathe trace`: which data, code and settings produced this model, and can that answer be trusted?

Trace first finds the package (a folder, an archive, a bare model file through its stamp, or a
sha256 from a plant's records, in the working tree or in the history of dvc.lock and the DVC
cache), then verifies it with the offline checks of `lathe verify` (hashes, stamp, package id,
signature by a trusted key; nothing is run), then, inside a repository, cross-checks the lineage
against git history: the recorded commit, `data/raw.dvc` at that commit, and a committed dvc.lock
holding the shipped model's whole chain of stage hashes.

Verdict (first line, and exit status):
  VERIFIED (0)   every check passed, signed by a trusted key
  MISMATCH (2)   a hash, the stamp, the id, the signature or the repository contradicts the package
  UNVERIFIED (3) consistent, but no trusted key to check the signature with
  UNKNOWN (4)    verified, but the repository cannot vouch for its lineage (commit or dvc.lock not there)
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lathe.audit.integrity import check_archive_sidecar, model_stamp_of, read_package_file
from lathe.audit.report import VerifyReport
from lathe.audit.trust import Trust, git_toplevel
from lathe.audit.verify import ARCHIVE_SUFFIX, offline_checks
from lathe.errors import LatheError
from lathe.io import load_yaml, printable, sha256_file
from lathe.ship.contract import MANIFEST_FILE, MANIFEST_SHA_KEY, MAX_FILE_BYTES, MODEL_FILE, PACKAGE_ID_KEY
from lathe.ship.lineage import lock_mismatch

HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
PACKAGES_DIR = Path("models/packages")
EXIT_STATUS = {"VERIFIED": 0, "MISMATCH": 2, "UNVERIFIED": 3, "UNKNOWN": 4}


@dataclass
class Located:
    pkg: Path  # a folder holding the package's files (maybe a temporary copy)
    names: list[str]  # names the package goes by (folder, archive): bound to its target
    how: str
    source: str
    model_bytes: bytes | None = None  # the bare model file traced, when that was the subject
    archive: Path | None = None  # the archive it was unpacked from, when it was one
    skipped: list[str] = field(default_factory=list)  # unreadable packages passed over while searching


# ---------------------------------------------------------------------------------------------
# finding the package


def _package_dirs(root: Path, skipped: list[str]) -> list[Path]:
    folder = root / PACKAGES_DIR
    if not folder.is_dir():
        return []
    out = []
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            if (d / MANIFEST_FILE).is_file():
                out.append(d)
            else:
                skipped.append(f"{printable(str(d))}: no {MANIFEST_FILE}")
    return out


def _sha(path: Path, skipped: list[str]) -> str | None:
    try:
        if path.stat().st_size > max(MAX_FILE_BYTES.values()):
            return None
        return sha256_file(path)
    except OSError as exc:
        skipped.append(f"{printable(str(path))}: unreadable ({exc.strerror or exc})")
        return None


def _unstamped_in_manifest(d: Path, skipped: list[str]) -> str | None:
    try:
        data = read_package_file(d, MANIFEST_FILE)
        return str(((json.loads(data) or {}).get("files") or {}).get(MODEL_FILE) or "") or None
    except (LatheError, ValueError, AttributeError, OSError) as exc:
        skipped.append(f"{printable(str(d))}: {printable(str(exc), 120)}")
        return None


def _from_archive(archive: Path, tmp: Path, how: str) -> Located:
    from lathe.ship.archive import extract_package

    pkg = extract_package(archive, tmp / "archive")
    return Located(pkg, [archive.name.removesuffix(ARCHIVE_SUFFIX), pkg.name], how, printable(str(archive)),
                   archive=archive)


def _search_working(want: str, root: Path, tmp: Path, skipped: list[str]) -> Located | None:
    """A package folder or archive under models/packages whose model, manifest or archive hashes to `want`."""
    for d in _package_dirs(root, skipped):
        for name in (MODEL_FILE, MANIFEST_FILE):
            if (d / name).is_file() and _sha(d / name, skipped) == want:
                return Located(d, [d.name], f"sha256 of {name}", printable(str(d)))
        if _unstamped_in_manifest(d, skipped) == want:
            return Located(d, [d.name], "unstamped model sha256 in the manifest", printable(str(d)))
    folder = root / PACKAGES_DIR
    for archive in sorted(folder.glob(f"*{ARCHIVE_SUFFIX}")) if folder.is_dir() else []:
        if _sha(archive, skipped) == want:
            return _from_archive(archive, tmp, "sha256 of the archive")
    return None


def _search_history(want: str, repo: Path, tmp: Path, skipped: list[str]) -> Located | None:
    """A package of an earlier commit (dvc.lock history + DVC cache or local remote) matching `want`."""
    from lathe.audit import history

    stores = history.stores(repo)
    for rec in history.package_records(repo):
        found = history.hashes_of(stores, rec)
        what = next((k for k, v in found.items() if v == want), None)
        if what is None:
            continue
        pkg = history.materialise(stores, rec, tmp / "history" / rec.commit[:12])
        if pkg is None:
            skipped.append(f"package {rec.target} of commit {rec.commit[:12]} matches, but its files are not all "
                           "in the DVC cache (run `dvc fetch` for that commit)")
            continue
        return Located(pkg, [rec.target], f"sha256 of the {what} of package {rec.target} in dvc.lock at "
                       f"{rec.commit[:12]}, restored from the DVC cache", f"{rec.target} @ {rec.commit[:12]}")
    return None


def locate(subject: str, repo: Path | None, tmp: Path) -> Located:
    """Resolve PACKAGE | ARCHIVE | MODEL.onnx | SHA256 to a folder holding the package's files."""
    root = repo or Path.cwd()
    path = Path(subject)
    if path.is_dir():
        if not (path / MANIFEST_FILE).exists():
            raise LatheError(f"{printable(subject)}: a folder without {MANIFEST_FILE}; not a package")
        return Located(path, [path.name], "package folder", printable(subject))
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIX):
        return _from_archive(path, tmp, "package archive")
    if path.is_file():
        return _locate_model(path, root, repo, tmp)
    if HEX64.match(subject):
        want, skipped = subject.lower(), list[str]()
        found = _search_working(want, root, tmp, skipped) or (
            _search_history(want, repo, tmp, skipped) if repo is not None else None)
        if found is None:
            where = f"{root / PACKAGES_DIR}" + (" or the packages of earlier commits" if repo else "")
            raise LatheError(f"no package in {where} has a model, manifest or archive with sha256 {want}"
                             + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
        found.skipped = skipped
        return found
    near = did_you_mean(path, root)
    raise LatheError(f"{printable(subject)}: no such package folder, archive, model file, and not a sha256"
                     + (f"; did you mean {near}?" if near else ""))


def _locate_model(path: Path, root: Path, repo: Path | None, tmp: Path) -> Located:
    if path.stat().st_size > MAX_FILE_BYTES[MODEL_FILE]:
        raise LatheError(f"{printable(str(path))}: too large for a package model")
    data = path.read_bytes()
    stamp = model_stamp_of(data)
    if not stamp:
        raise LatheError(f"{printable(str(path))}: the model carries no {PACKAGE_ID_KEY} / {MANIFEST_SHA_KEY} "
                         "metadata; it did not come out of a lathe package")
    want, skipped = stamp.get(MANIFEST_SHA_KEY, ""), list[str]()
    beside = path.parent
    found: Located | None
    if (beside / MANIFEST_FILE).is_file() and _sha(beside / MANIFEST_FILE, skipped) == want:
        found = Located(beside, [beside.name], "model stamp: the manifest beside it", printable(str(path)))
    else:
        found = _search_working(want, root, tmp, skipped) or (
            _search_history(want, repo, tmp, skipped) if repo is not None else None)
    if found is None:
        raise LatheError(f"{printable(str(path))}: package {printable(stamp.get(PACKAGE_ID_KEY, '?'), 40)} "
                         f"(manifest sha256 {printable(want, 70)}): no such manifest beside the model, under "
                         f"{root / PACKAGES_DIR} or in the packages of earlier commits")
    found.how, found.source, found.model_bytes, found.skipped = (
        f"model stamp ({found.how})", printable(str(path)), data, skipped)
    return found


def did_you_mean(path: Path, root: Path) -> str | None:
    """The closest existing name beside a missing `path` (`line_pc` -> `models/packages/line-pc`), or None.

    Looks in the path's folder (as given, else under `root`, the repository), or in root/models/packages
    for a bare name."""
    import difflib

    if str(path.parent) in ("", "."):
        folder = root / PACKAGES_DIR
    else:
        folder = path.parent if path.parent.is_dir() else root / path.parent
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, names, n=1)
    return str((path.parent if folder == path.parent else folder) / close[0]) if close else None


# ---------------------------------------------------------------------------------------------
# the repository cross-check


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def cross_check(manifest: dict, repo: Path) -> dict[str, Any]:
    """The manifest against the repository: status OK, MISMATCH or UNKNOWN, and the findings behind it."""
    from lathe.audit.history import lock_history

    findings: list[str] = []
    commit = str((manifest.get("git") or {}).get("commit") or "")
    raw = manifest.get("raw_data") or {}
    raw_path = str(raw.get("path") or "data/raw")
    out: dict[str, Any] = {"repo": str(repo), "recorded_commit": commit}
    mismatch = unknown = False
    if not commit or _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        unknown = True
        findings.append(f"the recorded commit {commit[:12] or '(none)'} is not in this repository")
    else:
        res = _git(repo, "show", f"{commit}:{raw_path}.dvc")
        try:
            outs = (yaml.safe_load(res.stdout) or {}).get("outs") or [] if res.returncode == 0 else []
            repo_md5 = outs[0].get("md5") if outs else None
        except (yaml.YAMLError, AttributeError):
            repo_md5 = None
        if repo_md5 != raw.get("md5"):
            mismatch = True
            findings.append(f"MISMATCH raw data: the package says {raw.get('md5')} but {raw_path}.dvc at "
                            f"{commit[:12]} says {repo_md5 or '(missing or unreadable)'}")
        else:
            findings.append(f"raw data md5 {repo_md5} = {raw_path}.dvc at {commit[:12]}")

    stages = manifest.get("stages") or {}
    model_out = _model_out(manifest)
    holding, partial = [], []
    for c, lock in lock_history(repo):
        why = lock_mismatch(lock, stages)
        if why is None:
            holding.append(c)
        elif model_out and model_out in _out_md5s(lock):
            partial.append((c, why))
    out["lock_commits"] = holding
    if holding:
        at = " (the recorded commit among them)" if commit in holding else ""
        findings.append(f"dvc.lock holds the model's whole chain ({len(stages)} stages) in {len(holding)} "
                        f"commit(s){at}; newest {holding[0][:12]}")
    elif partial:
        mismatch = True
        c, why = partial[0]
        findings.append(f"MISMATCH chain: dvc.lock at {c[:12]} lists the model ({model_out}) but {why}")
    else:
        unknown = True
        work = repo / "dvc.lock"
        try:
            work_lock = load_yaml(work.read_text()) if work.is_file() else None
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            work_lock = None
        in_work = isinstance(work_lock, dict) and lock_mismatch(work_lock, stages) is None
        findings.append("no committed dvc.lock holds the model's chain" + (
            "; the working dvc.lock does: commit it (`git add dvc.lock && git commit`)" if in_work else ""))
    out["status"] = "MISMATCH" if mismatch else "UNKNOWN" if unknown else "OK"
    out["findings"] = findings
    return out


def _model_out(manifest: dict) -> str | None:
    """md5 of the shipped variant's model folder (the out of the last stage before packaging)."""
    chain = [c for c in manifest.get("chain") or [] if not str(c).startswith("package@")]
    entry = (manifest.get("stages") or {}).get(chain[-1]) if chain else None
    outs = [o.get("md5") for o in (entry or {}).get("outs") or [] if isinstance(o, dict)]
    return outs[0] if len(outs) == 1 else None


def _out_md5s(lock: dict) -> set[str]:
    return {str(o.get("md5")) for e in (lock.get("stages") or {}).values() if isinstance(e, dict)
            for o in e.get("outs") or [] if isinstance(o, dict) and o.get("md5")}


# ---------------------------------------------------------------------------------------------
# the whole trace


def trace(subject: str, trust: Trust, repo: Path | None = None) -> dict[str, Any]:
    """The lineage of a package, archive, model file or sha256, verified, as a JSON-able dict."""
    top = git_toplevel(Path(repo)) if repo is not None else git_toplevel(Path.cwd())
    if repo is not None and top is None:
        raise LatheError(f"{printable(str(repo))} is not a git repository")
    with tempfile.TemporaryDirectory(prefix="lathe-trace-") as tmp:
        found = locate(subject, top, Path(tmp))
        report = VerifyReport(subject=printable(subject))
        if found.archive is not None:
            check_archive_sidecar(found.archive, report)
        offline_checks(found.pkg, trust, report, found.names)
        if found.model_bytes is not None:
            same = (found.pkg / MODEL_FILE).is_file() and read_package_file(found.pkg, MODEL_FILE) == found.model_bytes
            report.add("model file", "PASS" if same else "FAIL",
                       "byte-identical to the package's model.onnx" if same else
                       "not byte-identical to the model.onnx of the package its stamp names")
    manifest = report.manifest_raw or {}
    result: dict[str, Any] = {
        "subject": printable(subject), "found_by": found.how, "source": found.source, "skipped": found.skipped,
        "checks": [c.as_dict() for c in report.checks], "facts": report.facts,
        "package_id": manifest.get("package_id"), "target": (manifest.get("target") or {}).get("name"),
        "variant": manifest.get("variant"), "raw_data": manifest.get("raw_data"),
        "validation": manifest.get("validation"), "git": manifest.get("git"), "build": manifest.get("build"),
        "calibration": manifest.get("calibration"), "qat": manifest.get("qat"), "params": manifest.get("params"),
        "metrics": manifest.get("metrics"), "gates": manifest.get("gates"),
        "chain": _chain(manifest),
    }
    failed = [c for c in report.checks if c.status == "FAIL"]
    unsigned = report.status_of("signature") == "SKIP"
    result["verdict"] = "MISMATCH" if failed else "UNVERIFIED" if unsigned else "VERIFIED"
    if top is not None and report.manifest is not None:
        result["cross_check"] = cross_check(manifest, top)
    return result


def exit_status(result: dict[str, Any]) -> int:
    """MISMATCH anywhere 2, else UNVERIFIED 3, else a repository that cannot vouch (UNKNOWN) 4, else 0."""
    cc = (result.get("cross_check") or {}).get("status")
    if result["verdict"] == "MISMATCH" or cc == "MISMATCH":
        return EXIT_STATUS["MISMATCH"]
    if result["verdict"] == "UNVERIFIED":
        return EXIT_STATUS["UNVERIFIED"]
    return EXIT_STATUS["UNKNOWN"] if cc == "UNKNOWN" else EXIT_STATUS["VERIFIED"]


def _chain(manifest: dict) -> list[dict[str, Any]]:
    """One row per chain element: the stage and the md5s of what it wrote (raw data first, package last)."""
    stages = manifest.get("stages") or {}
    raw = manifest.get("raw_data") or {}
    rows = []
    for name in manifest.get("chain") or []:
        name = str(name)
        if name == raw.get("path"):
            rows.append({"step": name, "outs": [{"path": name, "md5": raw.get("md5")}]})
        elif name in stages:
            rows.append({"step": name, "outs": [{"path": o.get("path"), "md5": o.get("md5")}
                                                 for o in stages[name].get("outs") or []]})
        elif name.startswith("package@"):
            files = manifest.get("files") or {}
            rows.append({"step": name, "outs": [{"path": f"{MODEL_FILE} (unstamped)", "sha256": files.get(MODEL_FILE)}]})
        else:
            rows.append({"step": name, "outs": [], "note": "not recorded in the manifest's stages"})
    return rows
