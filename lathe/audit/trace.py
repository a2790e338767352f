"""`lathe trace`: which data, code and settings produced this model?

Answers from the package alone (manifest.json; offline at the plant) and, when a git + DVC repo is
at hand, cross-checks the answer against its history: the commit whose dvc.lock lists the shipped
model's source hash, and `data/raw.dvc` at the recorded commit. A disagreement is reported as
`MISMATCH`, never smoothed over.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lathe.errors import LatheError
from lathe.io import sha256_bytes, sha256_file

HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
PACKAGES_DIR = Path("models/packages")
MAX_LOCK_COMMITS = 500  # dvc.lock history walked at most this deep


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatheError(f"{path}: not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise LatheError(f"{path}: not a lathe package manifest")
    return manifest


def _model_stamp(data: bytes) -> dict[str, str]:
    from lathe.ship.contract import model_stamp

    try:
        return model_stamp(data)
    except Exception as exc:
        raise LatheError(f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)


def find_repo(repo: Path | None) -> Path | None:
    """The git top-level of `repo` (or of the cwd when None); None outside a repository."""
    res = _git(Path(repo or Path.cwd()), "rev-parse", "--show-toplevel")
    if res.returncode != 0:
        if repo is not None:
            raise LatheError(f"{repo} is not a git repository")
        return None
    return Path(res.stdout.strip())


def _package_dirs(repo: Path | None) -> list[Path]:
    roots = [repo / PACKAGES_DIR] if repo else []
    if not repo:
        roots.append(Path.cwd() / PACKAGES_DIR)
    return sorted(d for r in roots if r.is_dir() for d in r.iterdir() if (d / "manifest.json").is_file())


def _archives(repo: Path | None) -> list[Path]:
    root = (repo or Path.cwd()) / PACKAGES_DIR
    return sorted(root.glob("*.tar.gz")) if root.is_dir() else []


def _from_archive(archive: Path) -> tuple[dict, bytes | None]:
    from lathe.ship.archive import safe_extract

    with tempfile.TemporaryDirectory(prefix="lathe-trace-") as tmp:
        safe_extract(archive, Path(tmp) / "x")
        tops = list((Path(tmp) / "x").iterdir())
        if len(tops) != 1:
            raise LatheError(f"{archive}: expected one top-level folder, found {[p.name for p in tops]}")
        model = tops[0] / "model.onnx"
        return _read_manifest(tops[0] / "manifest.json"), (model.read_bytes() if model.is_file() else None)


def locate(subject: str, repo: Path | None) -> dict[str, Any]:
    """Resolve PACKAGE | ARCHIVE | MODEL.onnx | SHA256 to {"manifest", "model_bytes", "source", "how"}."""
    path = Path(subject)
    if path.is_dir():
        model = path / "model.onnx"
        return {"manifest": _read_manifest(path / "manifest.json"), "source": str(path), "how": "package folder",
                "model_bytes": model.read_bytes() if model.is_file() else None}
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        manifest, model = _from_archive(path)
        return {"manifest": manifest, "model_bytes": model, "source": str(path), "how": "package archive"}
    if path.is_file():
        data = path.read_bytes()
        stamp = _model_stamp(data)
        if not stamp:
            raise LatheError(f"{path}: the model carries no lathe.package_id / lathe.manifest_sha256 metadata; "
                             "it did not come out of a lathe package")
        want = stamp.get("lathe.manifest_sha256")
        candidates = [path.parent / "manifest.json"] + [d / "manifest.json" for d in _package_dirs(repo)]
        for cand in candidates:
            if cand.is_file() and sha256_file(cand) == want:
                return {"manifest": _read_manifest(cand), "model_bytes": data, "how": "model metadata",
                        "source": str(path), "manifest_path": str(cand)}
        for archive in _archives(repo):
            try:
                manifest, _ = _from_archive(archive)
            except LatheError:
                continue
            if sha256_bytes((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()) == want:
                return {"manifest": manifest, "model_bytes": data, "how": "model metadata",
                        "source": str(path), "manifest_path": str(archive)}
        raise LatheError(f"{path}: package {stamp.get('lathe.package_id')} (manifest sha256 {want}) — no matching "
                         f"manifest.json beside the model or under {PACKAGES_DIR}/ of "
                         f"{repo or Path.cwd()}; copy the package folder or archive here")
    if HEX64.match(subject):
        want = subject.lower()
        for d in _package_dirs(repo):
            for name in ("model.onnx", "manifest.json"):
                if (d / name).is_file() and sha256_file(d / name) == want:
                    return {"manifest": _read_manifest(d / "manifest.json"), "how": f"sha256 of {name}",
                            "model_bytes": (d / "model.onnx").read_bytes(), "source": str(d)}
            manifest = _read_manifest(d / "manifest.json")
            if manifest.get("files", {}).get("model.onnx") == want:
                return {"manifest": manifest, "how": "unstamped model sha256 in manifest",
                        "model_bytes": (d / "model.onnx").read_bytes(), "source": str(d)}
        for archive in _archives(repo):
            if sha256_file(archive) == want:
                manifest, model = _from_archive(archive)
                return {"manifest": manifest, "model_bytes": model, "how": "sha256 of archive", "source": str(archive)}
        raise LatheError(f"no package under {(repo or Path.cwd()) / PACKAGES_DIR} has a model.onnx, manifest or "
                         f"archive with sha256 {want}")
    raise LatheError(f"{subject}: not a package folder, archive, model file or sha256")


def _chain(manifest: dict, model_sha: str | None) -> list[dict[str, Any]]:
    """One row per chain element: the stage and the md5s of what it wrote (raw data first, package last)."""
    stages = manifest.get("stages") or {}
    rows = []
    for name in manifest.get("chain") or []:
        if name == (manifest.get("raw_data") or {}).get("path"):
            rows.append({"step": name, "outs": [{"path": name, "md5": manifest["raw_data"].get("md5")}]})
        elif name in stages:
            rows.append({"step": name, "outs": [{"path": o.get("path"), "md5": o.get("md5")}
                                                 for o in stages[name].get("outs") or []]})
        elif name.startswith("package@"):
            files = manifest.get("files") or {}
            outs = [{"path": "model.onnx (unstamped sha256)", "sha256": files.get("model.onnx")}]
            if model_sha:
                outs.append({"path": "model.onnx (shipped sha256)", "sha256": model_sha})
            rows.append({"step": name, "outs": outs})
        else:
            rows.append({"step": name, "outs": [], "note": "not recorded in manifest stages"})
    return rows


def _source_hashes(manifest: dict) -> set[str]:
    """md5s dvc.lock would hold for the chosen variant's model: outs of the stage just before packaging."""
    chain = [c for c in manifest.get("chain") or [] if not c.startswith("package@")]
    stages = manifest.get("stages") or {}
    if chain and chain[-1] in stages:
        return {o.get("md5") for o in stages[chain[-1]].get("outs") or [] if o.get("md5")}
    return set()


def _lock_md5s(text: str) -> set[str]:
    try:
        lock = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return set()
    out = set()
    for entry in (lock.get("stages") or {}).values():
        for o in entry.get("outs") or []:
            if isinstance(o, dict) and o.get("md5"):
                out.add(o["md5"])
    return out


def cross_check(manifest: dict, repo: Path) -> dict[str, Any]:
    """Compare the manifest with the repo's history; status OK, MISMATCH or UNKNOWN plus findings."""
    findings: list[str] = []
    status = "OK"
    commit = (manifest.get("git") or {}).get("commit") or ""
    raw = manifest.get("raw_data") or {}
    out: dict[str, Any] = {"repo": str(repo), "recorded_commit": commit}

    if not commit or _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        status = "UNKNOWN"
        findings.append(f"recorded commit {commit or '(none)'} is not in this repository")
    else:
        res = _git(repo, "show", f"{commit}:{raw.get('path', 'data/raw')}.dvc")
        repo_md5 = None
        if res.returncode == 0:
            try:
                outs = (yaml.safe_load(res.stdout) or {}).get("outs") or []
                repo_md5 = outs[0].get("md5") if outs else None
            except yaml.YAMLError:
                pass
        out["raw_dvc_md5_at_commit"] = repo_md5
        if repo_md5 is None:
            status = "MISMATCH"
            findings.append(f"{raw.get('path', 'data/raw')}.dvc is missing or unreadable at {commit[:12]}")
        elif repo_md5 != raw.get("md5"):
            status = "MISMATCH"
            findings.append(f"MISMATCH raw data: the package says {raw.get('md5')} but "
                            f"{raw.get('path', 'data/raw')}.dvc at {commit[:12]} says {repo_md5}")
        else:
            findings.append(f"raw data md5 {repo_md5} = {raw.get('path', 'data/raw')}.dvc at {commit[:12]}")

    wanted = _source_hashes(manifest)
    out["source_md5s"] = sorted(wanted)
    if wanted:
        log = _git(repo, "log", f"--max-count={MAX_LOCK_COMMITS}", "--format=%H", "--all", "--", "dvc.lock")
        matches = []
        for c in log.stdout.split():
            show = _git(repo, "show", f"{c}:dvc.lock")
            if show.returncode == 0 and wanted & _lock_md5s(show.stdout):
                matches.append(c)
        out["lock_commits"] = matches
        if matches:
            findings.append(f"dvc.lock lists the model's source hash in {len(matches)} commit(s); "
                            f"newest {matches[0][:12]}, oldest {matches[-1][:12]}")
        else:
            if status == "OK":
                status = "UNKNOWN"
            findings.append("no committed dvc.lock lists the model's source hash "
                            f"({', '.join(sorted(wanted))}); commit dvc.lock after `dvc repro`")
    out["status"] = status
    out["findings"] = findings
    return out


def _params_summary(params: dict) -> dict[str, str]:
    """section -> 'k=v, k=v' (nested values in compact JSON), for the table."""
    out = {}
    for section, values in sorted((params or {}).items()):
        if isinstance(values, dict):
            out[section] = ", ".join(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}"
                                     for k, v in sorted(values.items()))
        else:
            out[section] = json.dumps(values)
    return out


def trace(subject: str, repo: Path | None = None) -> dict[str, Any]:
    """The lineage of a package, archive, model file or sha256 as a JSON-able dict."""
    top = find_repo(repo)
    found = locate(subject, top)
    manifest = found["manifest"]
    data = found.get("model_bytes")
    model_sha = sha256_bytes(data) if data else None
    result: dict[str, Any] = {
        "subject": subject, "found_by": found["how"], "source": found["source"],
        "manifest_path": found.get("manifest_path"),
        "package_id": manifest.get("package_id"), "target": (manifest.get("target") or {}).get("name"),
        "variant": manifest.get("variant"), "raw_data": manifest.get("raw_data"),
        "validation": manifest.get("validation"), "git": manifest.get("git"),
        "build": manifest.get("build"), "calibration": manifest.get("calibration"),
        "params": manifest.get("params"), "params_summary": _params_summary(manifest.get("params") or {}),
        "chain": _chain(manifest, model_sha), "model_sha256": model_sha,
        "source_model_sha256": manifest.get("source_model_sha256"), "gates": manifest.get("gates"),
    }
    if data:
        from lathe.ship.contract import unstamped_model_bytes

        stamp = _model_stamp(data)
        unstamped = sha256_bytes(unstamped_model_bytes(data))
        ok = unstamped == (manifest.get("files") or {}).get("model.onnx") and \
            stamp.get("lathe.package_id") == manifest.get("package_id")
        result["model_matches_manifest"] = ok
    if top is not None:
        result["cross_check"] = cross_check(manifest, top)
        if result.get("model_matches_manifest") is False:
            result["cross_check"]["status"] = "MISMATCH"
            result["cross_check"]["findings"].append("MISMATCH model: model.onnx does not hash to the manifest's entry")
    elif result.get("model_matches_manifest") is False:
        result["cross_check"] = {"status": "MISMATCH", "findings": [
            "MISMATCH model: model.onnx does not hash to the manifest's entry"]}
    return result


def print_trace(result: dict[str, Any], console) -> None:
    """Human-readable tables for `lathe trace`."""
    from rich.table import Table

    raw = result.get("raw_data") or {}
    val = result.get("validation") or {}
    git = result.get("git") or {}
    build = result.get("build") or {}
    t = Table(title=f"trace: package {result.get('package_id')} ({result.get('target')})", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("found by", f"{result['found_by']}: {result['source']}")
    t.add_row("variant", str(result.get("variant")))
    t.add_row("raw data md5", f"{raw.get('md5')}  ({raw.get('path')})")
    t.add_row("raw files / samples", f"{raw.get('files')} files, {raw.get('samples')} samples")
    t.add_row("class counts", ", ".join(f"{k}: {v}" for k, v in sorted((raw.get("class_counts") or {}).items())))
    ok = val.get("success")
    t.add_row("validation", f"{'[green]passed[/]' if ok else '[bold red]FAILED[/]'} — {val.get('summary')} "
                            f"(sha256 {str(val.get('sha256'))[:16]}…)")
    t.add_row("git commit", f"{git.get('commit')}{' [bold red](dirty tree)[/]' if git.get('dirty') else ''}")
    t.add_row("build", f"{build.get('time')}, flow run {build.get('flow_run_id')}")
    if result.get("model_sha256"):
        match = result.get("model_matches_manifest")
        t.add_row("model.onnx sha256", f"{result['model_sha256']} "
                                       f"({'[green]matches manifest[/]' if match else '[bold red]DOES NOT match manifest[/]'})")
    for section, summary in result.get("params_summary", {}).items():
        t.add_row(f"params.{section}", summary)
    console.print(t)

    c = Table(title="chain of stage hashes, raw data -> shipped file")
    c.add_column("step", style="bold")
    c.add_column("output")
    c.add_column("hash", overflow="fold")
    for row in result.get("chain") or []:
        outs = row.get("outs") or [{"path": row.get("note", ""), "md5": ""}]
        for i, o in enumerate(outs):
            h = o.get("md5") or o.get("sha256") or ""
            c.add_row(row["step"] if i == 0 else "", str(o.get("path")), f"{'sha256 ' if o.get('sha256') else 'md5 '}{h}")
    console.print(c)

    cc = result.get("cross_check")
    if cc is None:
        console.print("(not inside a git repository: no history cross-check; pass --repo to add one)")
        return
    status = cc.get("status")
    style = {"OK": "bold green", "MISMATCH": "bold white on red", "UNKNOWN": "bold yellow"}.get(status, "bold")
    console.print(f"[{style}]repository cross-check: {status}[/]")
    for f in cc.get("findings", []):
        console.print(f"  [{'bold red' if f.startswith('MISMATCH') else 'default'}]{f}[/]")
