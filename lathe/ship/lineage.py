"""Lineage of a package: git state, the dvc.lock chain of stages, raw data, validation, how its INT8
model was made (calibration or quantization-aware training), library versions. dvc.yaml and dvc.lock are read as YAML; DVC is never imported."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from lathe.compress.records import QAT_RECORD, QUANTIZE_RECORD
from lathe.errors import DataError, LatheError
from lathe.io import read_json, sha256_file

LIBRARIES = {"torch": "torch", "torchao": "torchao", "onnx": "onnx", "onnxruntime": "onnxruntime", "dvc": "dvc",
             "prefect": "prefect", "great_expectations": "great-expectations", "model_signing": "model-signing",
             "numpy": "numpy"}


def _git(root: Path, *args: str) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LatheError("git is not installed; a package records the commit it was built from") from exc
    if res.returncode != 0:
        raise LatheError(f"git {' '.join(args)} failed in {root}: {res.stderr.strip()}")
    return res.stdout


def git_head(root: Path) -> tuple[str, str]:
    """(commit sha, commit time ISO 8601 UTC) of HEAD."""
    out = _git(root, "log", "-1", "--format=%H %ct", "HEAD").split()
    if len(out) != 2:
        raise LatheError(f"{root}: no git commit yet; commit the project before packaging")
    when = datetime.fromtimestamp(int(out[1]), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return out[0], when


def _expand(template: str, ctx: dict[str, Any]) -> str:
    def sub(m: re.Match) -> str:
        value: Any = ctx
        for part in m.group(1).strip().split("."):
            value = value[part] if isinstance(value, dict) else value[int(part)]
        return str(value)

    return re.sub(r"\$\{([^}]+)\}", sub, template)


def _entry_paths(entries: Any) -> list[str]:
    out = []
    for e in entries or []:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, dict):
            out.extend(str(k) for k in e)
    return out


def dvc_output_paths(root: Path) -> set[str]:
    """Every path a dvc.yaml stage writes (outs, metrics, plots; foreach expanded) or dvc.lock lists as out.

    Read as YAML: `foreach` over a literal list/dict or a `${var}` from dvc.yaml `vars` / params.yaml.
    """
    paths: set[str] = set()
    dvc_yaml = root / "dvc.yaml"
    if dvc_yaml.is_file():
        doc = yaml.safe_load(dvc_yaml.read_text()) or {}
        ctx: dict[str, Any] = {}
        if (root / "params.yaml").is_file():
            ctx.update(yaml.safe_load((root / "params.yaml").read_text()) or {})
        for v in doc.get("vars") or []:
            if isinstance(v, dict):
                ctx.update(v)
        for stage in (doc.get("stages") or {}).values():
            body = stage
            items: list[tuple[dict, Any]] = [({}, None)]  # (key, item) context of each expansion
            if "foreach" in stage:
                body = stage.get("do") or {}
                fe = stage["foreach"]
                if isinstance(fe, str):
                    m = re.fullmatch(r"\$\{([^}]+)\}", fe.strip())
                    fe = ctx.get(m.group(1).strip()) if m else None
                if isinstance(fe, dict):
                    items = [({"key": k, "item": v}, None) for k, v in fe.items()]
                elif isinstance(fe, list):
                    items = [({"item": v}, None) for v in fe]
                else:
                    items = []
            for local, _ in items:
                for key in ("outs", "metrics", "plots"):
                    for p in _entry_paths(body.get(key)):
                        try:
                            paths.add(_expand(p, {**ctx, **local}))
                        except (KeyError, IndexError, ValueError, TypeError):
                            continue
    lock = root / "dvc.lock"
    if lock.is_file():
        doc = yaml.safe_load(lock.read_text())
        stages = doc.get("stages") if isinstance(doc, dict) else None
        for entry in (stages if isinstance(stages, dict) else {}).values():
            paths.update(o["path"] for o in entry.get("outs") or [] if isinstance(o, dict) and "path" in o)
    return {str(PurePosixPath(p)) for p in paths}


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


# Written by `make bench` / `make killtest`, never read by a stage: a fresh measurement must not block packaging.
MEASUREMENT_REPORTS = ("reports/bench.md", "reports/bench.json", "reports/kill_test.json")


def dirty_paths(root: Path, also_ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Uncommitted changes (untracked files included) outside DVC-managed outputs, dvc.lock and `also_ignore`.

    DVC rewrites its outputs, dvc.lock and the .gitignore files beside its outputs while `dvc repro`
    runs, so those do not make a build dirty; code, params, data/raw.dvc or a stray file do.
    """
    outs = dvc_output_paths(root) | {str(PurePosixPath(p)) for p in also_ignore}
    out_parents = {str(PurePosixPath(p).parent) for p in outs}
    raw = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    fields = raw.split("\0")
    dirty, i = [], 0
    while i < len(fields):
        rec = fields[i]
        i += 1
        if len(rec) < 4:
            continue
        status, path = rec[:2], rec[3:]
        if status[0] in "RC":
            i += 1  # the next field is the rename's source
        if path == "dvc.lock" or _under(path, outs):
            continue
        p = PurePosixPath(path)
        if p.name == ".gitignore" and str(p.parent) in out_parents:
            continue
        dirty.append(path)
    return sorted(dirty)


def _rel(root: Path, path: Path) -> str:
    p = Path(path)
    try:
        return PurePosixPath(os.path.relpath(p.resolve(), Path(root).resolve())).as_posix()
    except ValueError:
        return p.as_posix()


def is_measurement(path: str) -> bool:
    """An evaluate stage's reports/<variant>/metrics.json: it holds latency measured on the machine that
    ran it, so its md5 is not part of any lineage (the manifest carries the metrics themselves)."""
    return path.startswith("reports/") and path.endswith("/metrics.json")


def _lock_entry(entry: dict) -> dict:
    def files(items):
        return [{"path": d["path"], "md5": None if is_measurement(d["path"]) else d.get("md5")} for d in items or []]

    return {"cmd": entry.get("cmd"), "deps": files(entry.get("deps")), "outs": files(entry.get("outs")),
            "params": entry.get("params") or {}}


def lock_mismatch(lock: dict, stages: dict) -> str | None:
    """Why dvc.lock `lock` does not hold the recorded stage entries `stages` (a manifest's), or None when it does."""
    from lathe.ship.contract import canonical_json

    entries: dict = lock["stages"] if isinstance(lock.get("stages"), dict) else {}
    for name, recorded in sorted(stages.items()):
        if name not in entries:
            return f"it has no stage {name}"
        try:
            entry = _lock_entry(entries[name])
        except (KeyError, TypeError, AttributeError):
            return f"its stage {name} is malformed"
        if canonical_json(entry) != canonical_json(recorded):
            return f"its stage {name} differs"
    return None


def lock_record(root: Path, lock_path: Path, commit: str, entries: dict) -> dict:
    """The dvc.lock a package is built with: its sha256 as read, and whether `commit`'s dvc.lock holds
    every stage of the package's chain as recorded (else the lineage matches no commit yet: commit
    dvc.lock after the run)."""
    try:
        committed = yaml.safe_load(_git(root, "show", f"{commit}:dvc.lock")) or {}
    except (LatheError, yaml.YAMLError):
        committed = {}
    holds = isinstance(committed, dict) and lock_mismatch(committed, entries) is None
    return {"sha256": sha256_file(Path(lock_path)), "commit_holds_chain": holds}


def stage_chain(lock: dict, start_paths: list[str]) -> tuple[list[str], dict[str, dict], set[str]]:
    """Walk dvc.lock backwards from `start_paths`: the stages that produced them, their deps' producers, ...

    Returns (stage names in dependency order, their lock entries (cmd, deps/outs with md5, params),
    the leaf data paths no stage produces, e.g. data/raw). Code files (*.py) are not followed.
    """
    stages = lock.get("stages") or {}
    producer: dict[str, str] = {}
    for name, entry in stages.items():
        for o in entry.get("outs") or []:
            producer[o["path"]] = name

    def producers_of(path: str) -> list[str]:
        found = {n for out, n in producer.items() if _under(path, {out}) or _under(out, {path})}
        return sorted(found)

    order: list[str] = []
    leaves: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in visiting:
            return
        visiting.add(name)
        for dep in sorted(d["path"] for d in stages[name].get("deps") or []):
            if dep.endswith(".py"):
                continue
            names = producers_of(dep)
            if not names:
                leaves.add(dep)
            for n in names:
                visit(n)
        visiting.discard(name)
        order.append(name)

    for path in start_paths:
        names = producers_of(path)
        if not names:
            raise LatheError(f"dvc.lock has no stage that produces {path}; run `dvc repro` before packaging")
        for n in names:
            visit(n)
    return order, {n: _lock_entry(stages[n]) for n in order}, leaves


def raw_data_record(root: Path, raw_dvc: Path, prepared_dir: Path) -> dict:
    """md5 and file count from the .dvc file, samples and class counts from data/prepared/manifest.csv."""
    from lathe.data.ingest import read_manifest

    if not raw_dvc.is_file():
        raise DataError(f"{raw_dvc}: not found; the raw data must be DVC-tracked (`dvc add data/raw`)")
    outs = (yaml.safe_load(raw_dvc.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{raw_dvc}: expected one out with an md5")
    rows = read_manifest(Path(prepared_dir) / "manifest.csv")
    counts: dict[str, int] = {}
    index: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        index[r["label"]] = int(r["label_index"])
    return {"path": _rel(root, raw_dvc.parent / outs[0]["path"]), "md5": outs[0]["md5"],
            "files": outs[0].get("nfiles"), "samples": len(rows),
            "class_counts": {k: counts[k] for k in sorted(counts, key=index.__getitem__)}}


def validation_record(validation_dir: Path) -> dict:
    path = Path(validation_dir) / "result.json"
    if not path.is_file():
        raise DataError(f"{path}: validation result not found (run the validate stage)")
    result = read_json(path)
    if not result.get("success"):
        raise DataError(f"{path}: the data gate failed; a package is never built from data that failed validation")
    stats = result.get("statistics") or {}
    summary = (f"{stats.get('successful_expectations', '?')}/{stats.get('evaluated_expectations', '?')} "
               f"expectations passed on {stats.get('rows', '?')} rows")
    return {"success": True, "sha256": sha256_file(path), "summary": summary}


def calibration_record(model_dir: Path) -> dict | None:
    """A post-training INT8 model's calibration set (hash of its sample ids, size, method); None otherwise."""
    path = Path(model_dir) / QUANTIZE_RECORD
    if not path.is_file():
        return None
    cal = read_json(path).get("calibration") or {}
    return {"sample_ids_sha256": cal.get("sample_ids_sha256"), "size": cal.get("size"), "method": cal.get("method")}


def qat_record(model_dir: Path) -> dict | None:
    """A quantization-aware model's making: method, schedule, number formats, the float network and teacher
    it was fine-tuned from (weight hashes); None for any other model. It has no calibration set: its ranges
    were learned during fine-tuning on the train split."""
    path = Path(model_dir) / QAT_RECORD
    if not path.is_file():
        return None
    rec = read_json(path)
    settings = rec.get("settings") or {}
    return {"method": rec.get("method"), "epochs": settings.get("epochs"), "best_epoch": rec.get("best_epoch"),
            "quantization": rec.get("quantization"),
            "source_weights_sha256": (rec.get("source") or {}).get("weights_sha256"),
            "teacher_weights_sha256": (rec.get("teacher") or {}).get("weights_sha256")}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in LIBRARIES.items():
        try:
            out[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[key] = None
    return out
