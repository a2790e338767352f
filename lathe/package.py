"""Build a device package for one target: choose the variant, set the threshold, record the lineage.

`build_package` is the whole step (the `package` stage calls it). It reads the evaluated variants
(models/<v>/model.onnx, reports/<v>/metrics.json), the prepared data, the validation result,
`data/raw.dvc`, `dvc.yaml`/`dvc.lock` (as YAML; DVC is never imported) and git (through the `git`
command), and writes `models/packages/<target>/` plus `<target>.tar.gz` and `.sha256`. The format is
docs/package-format.md (schema `lathe.package/1`).

Every check (dirty tree, signing key, gates) runs before anything is written; the package folder is
built beside the destination and swapped in with renames, so a failure or a crash leaves the old
package or the new one, never a mix. Given the same inputs and commit, every file except
`signature` is byte-identical (the build time is the commit time of HEAD).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import yaml

from lathe.config import EvaluateParams, PackageParams, TargetParams
from lathe.errors import ConfigError, DataError, LatheError
from lathe.export import write_metadata
from lathe.io import read_json, remove_dead_temps, sha256_bytes, sha256_file, temp_prefix

SCHEMA = "lathe.package/1"
MODEL_FILE = "model.onnx"
PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "model_card.md"
SELFTEST_FILE = "selftest.npz"
PACKAGE_ID_KEY = "lathe.package_id"
MANIFEST_SHA_KEY = "lathe.manifest_sha256"
STAMP_KEYS = (PACKAGE_ID_KEY, MANIFEST_SHA_KEY)
THRESHOLD_SPLIT = "val"
REPORT_SPLIT = "test"
THRESHOLD_DECIMALS = 6  # the threshold is rounded down to this, so the rounded value still meets the target
SELFTEST_ATOL = 1e-3  # logits; a device's onnxruntime build may differ in the last bits (int8 kernels more)
CLASS_NAMES = ["functional (p=0)", "possibly defective (p=1/3)", "probably defective (p=2/3)", "defective (p=1)"]
LIBRARIES = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "dvc": "dvc", "prefect": "prefect",
             "great_expectations": "great-expectations", "model_signing": "model-signing", "numpy": "numpy"}
GATES = ("max_size_bytes", "max_latency_p50_ms", "min_accuracy", "min_defective_recall", "max_false_reject_rate")
ENV_KEY = "LATHE_SIGNING_KEY"
ENV_ALLOW_DIRTY = "LATHE_ALLOW_DIRTY"
ENV_FLOW_RUN = "LATHE_FLOW_RUN_ID"


# ---------------------------------------------------------------------------------------------
# The model.onnx stamp


def unstamped_model_bytes(data: bytes) -> bytes:
    """The ONNX bytes with the `lathe.package_id` / `lathe.manifest_sha256` metadata entries removed.

    manifest.json's `files["model.onnx"]` is the sha256 of this (the stamp carries the manifest's
    hash, so the manifest cannot carry the stamped file's). Other metadata stays, sorted.
    """
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props if p.key not in STAMP_KEYS}
    write_metadata(proto, props)
    return proto.SerializeToString(deterministic=True)


def stamp_model_bytes(data: bytes, package_id: str, manifest_sha256: str) -> bytes:
    """`data` with the two package entries set in metadata_props (sorted)."""
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({PACKAGE_ID_KEY: package_id, MANIFEST_SHA_KEY: manifest_sha256})
    write_metadata(proto, props)
    return proto.SerializeToString(deterministic=True)


def model_stamp(data: bytes) -> dict[str, str]:
    """The package entries of an ONNX file's metadata_props (empty when unstamped)."""
    proto = onnx.load_from_string(data)
    return {p.key: p.value for p in proto.metadata_props if p.key in STAMP_KEYS}


# ---------------------------------------------------------------------------------------------
# JSON and npz, byte-stable


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: the bytes the package id is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_text(manifest: dict) -> str:
    """manifest.json as written: sorted keys, 2-space indent, trailing newline (as `lathe.io.write_json`)."""
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"


def package_id_of(manifest: dict) -> str:
    """First 16 hex of sha256 over the canonical manifest without `package_id` and `build`."""
    body = {k: v for k, v in manifest.items() if k not in ("package_id", "build")}
    return sha256_bytes(canonical_json(body))[:16]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (np.load-able with allow_pickle=False) with fixed zip timestamps: byte-stable.

    np.savez stamps members with the current time, so two builds would differ.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise ValueError(f"{name}: object arrays would need pickle")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Decision threshold


@dataclass(frozen=True)
class Threshold:
    value: float  # p_defective >= value -> judged defective
    recall_target: float
    val: dict[str, float | int]  # recall, false-reject rate and counts at `value` on the val split
    test: dict[str, float | int]  # the same on the test split


def p_defective(logits: np.ndarray, defective_from: int) -> np.ndarray:
    """(N, K) logits -> (N,) float64 softmax mass on classes >= defective_from."""
    from lathe.evaluate import softmax

    return softmax(logits)[:, defective_from:].sum(axis=1)


def rates_at(p_def: np.ndarray, labels: np.ndarray, defective_from: int, threshold: float) -> dict[str, float | int]:
    """Defective recall, escape rate and false-reject rate (functional judged defective) at `threshold`."""
    defective = np.asarray(labels) >= defective_from
    judged = np.asarray(p_def) >= threshold
    n_def, n_fun = int(defective.sum()), int((~defective).sum())
    tp, fp = int((defective & judged).sum()), int((~defective & judged).sum())
    recall = tp / n_def if n_def else 0.0
    return {"defective_recall": round(recall, 6), "escape_rate": round(1 - recall, 6) if n_def else 0.0,
            "false_reject_rate": round(fp / n_fun, 6) if n_fun else 0.0, "n_defective": n_def, "n_functional": n_fun}


def choose_threshold(p_def: np.ndarray, labels: np.ndarray, defective_from: int, recall_target: float) -> float:
    """The highest threshold t with recall(p_def >= t) >= recall_target on these samples.

    With n defective samples, k = ceil(target * n) of them must be caught: t is the k-th highest
    p_defective among the defective samples, rounded *down* to THRESHOLD_DECIMALS (so the rounded
    threshold still catches them). Ties in p_defective only raise the recall at t. Deterministic.
    """
    p_def = np.asarray(p_def, dtype=np.float64)
    scores = np.sort(p_def[np.asarray(labels) >= defective_from])[::-1]
    if len(scores) == 0:
        raise DataError(f"the {THRESHOLD_SPLIT} split holds no defective sample (class >= {defective_from}); "
                        "cannot choose a decision threshold")
    k = max(1, math.ceil(recall_target * len(scores) - 1e-9))
    scale = 10 ** THRESHOLD_DECIMALS
    return math.floor(float(scores[k - 1]) * scale) / scale


# ---------------------------------------------------------------------------------------------
# Candidates and gates


@dataclass(frozen=True)
class Candidate:
    variant: str
    metrics: dict  # reports/<variant>/metrics.json
    threshold: Threshold
    gates: list[dict]  # [{"gate", "limit", "value", "passed"}] in GATES order

    @property
    def passed(self) -> bool:
        return all(g["passed"] for g in self.gates)


def check_gates(gates_cfg, metrics: dict, threshold: Threshold) -> list[dict]:
    """Every gate of the profile against one variant; a null limit is reported as passed (not gated)."""
    values = {
        "max_size_bytes": metrics["size_bytes"],
        "max_latency_p50_ms": metrics["latency_p50_ms"],
        "min_accuracy": metrics["accuracy"],
        "min_defective_recall": threshold.test["defective_recall"],
        "max_false_reject_rate": threshold.test["false_reject_rate"],
    }
    out = []
    for gate in GATES:
        limit, value = getattr(gates_cfg, gate), values[gate]
        if limit is None:
            passed = True
        elif gate.startswith("max_"):
            passed = value <= limit
        else:
            passed = value >= limit
        out.append({"gate": gate, "limit": limit, "value": value, "passed": bool(passed)})
    return out


def select(candidates: list[Candidate]) -> Candidate | None:
    """Among candidates passing every gate: the smallest, then the fastest (p50), then by name."""
    ok = [c for c in candidates if c.passed]
    if not ok:
        return None
    return min(ok, key=lambda c: (c.metrics["size_bytes"], c.metrics["latency_p50_ms"], c.variant))


def _fmt(gate: str, value: float | int | None) -> str:
    if value is None:
        return "-"
    if gate == "max_size_bytes":
        return f"{int(value):,} B"
    if gate == "max_latency_p50_ms":
        return f"{value:.3f} ms"
    return f"{value:.3f}"


def gate_table(target: str, candidates: list[Candidate]) -> str:
    """Markdown: one row per variant, one column per gate ('value PASS|FAIL'), the limits in the header."""
    if not candidates:
        return "(no candidates)"
    limits = {g["gate"]: g["limit"] for g in candidates[0].gates}
    head = ["variant"] + [f"{g} ({_fmt(g, limits[g]) if limits[g] is not None else 'not gated'})" for g in GATES] + ["all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in candidates:
        cells = [c.variant] + [f"{_fmt(g['gate'], g['value'])} {'pass' if g['passed'] else 'FAIL'}" for g in c.gates]
        cells.append("pass" if c.passed else "FAIL")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_candidate(variant: str, models_dir: Path, reports_dir: Path, splits: dict[str, dict],
                       target: TargetParams, defective_from: int) -> tuple[Candidate, dict[str, np.ndarray]]:
    """Run the variant through onnxruntime on val (threshold) and test (rates there); check the gates.

    Returns the candidate and its logits per split.
    """
    from lathe.evaluate import load_session, model_files, predict

    model_path = models_dir / variant / MODEL_FILE
    metrics_path = reports_dir / variant / "metrics.json"
    files = model_files(model_path)
    if len(files) != 1:
        raise LatheError(f"{model_path}: keeps weights in external data files {[str(f) for f in files[1:]]}; "
                         "a package ships a single self-contained model.onnx")
    if not metrics_path.is_file():
        raise LatheError(f"{metrics_path}: metrics not found (run the evaluate stage for {variant})")
    metrics = read_json(metrics_path)
    missing = [k for k in ("size_bytes", "latency_p50_ms", "accuracy") if k not in metrics]
    if missing:
        raise LatheError(f"{metrics_path}: lacks {missing}; rerun the evaluate stage")
    session = load_session(model_path, threads=1)
    logits = {s: predict(session, splits[s]["images"]) for s in (THRESHOLD_SPLIT, REPORT_SPLIT)}
    val, test = splits[THRESHOLD_SPLIT], splits[REPORT_SPLIT]
    p_val = p_defective(logits[THRESHOLD_SPLIT], defective_from)
    p_test = p_defective(logits[REPORT_SPLIT], defective_from)
    t = choose_threshold(p_val, val["labels"], defective_from, target.defective_recall_target)
    threshold = Threshold(value=t, recall_target=target.defective_recall_target,
                          val=rates_at(p_val, val["labels"], defective_from, t),
                          test=rates_at(p_test, test["labels"], defective_from, t))
    return Candidate(variant, metrics, threshold, check_gates(target.gates, metrics, threshold)), logits


# ---------------------------------------------------------------------------------------------
# Git


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
    when = datetime.fromtimestamp(int(out[1]), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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
            body, items = stage, [({}, None)]
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


def dirty_paths(root: Path, also_ignore: set[str] = frozenset()) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Lineage: dvc.lock chain, raw data, validation, calibration, libraries


def _rel(root: Path, path: Path) -> str:
    p = Path(path)
    try:
        return PurePosixPath(os.path.relpath(p.resolve(), Path(root).resolve())).as_posix()
    except ValueError:
        return p.as_posix()


def _lock_entry(entry: dict) -> dict:
    def files(items):
        return [{"path": d["path"], "md5": d.get("md5")} for d in items or []]

    return {"cmd": entry.get("cmd"), "deps": files(entry.get("deps")), "outs": files(entry.get("outs")),
            "params": entry.get("params") or {}}


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
    from lathe.ingest import read_manifest

    if not raw_dvc.is_file():
        raise DataError(f"{raw_dvc}: not found; the raw data must be DVC-tracked (`dvc add data/raw`)")
    outs = (yaml.safe_load(raw_dvc.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{raw_dvc}: expected one out with an md5")
    rows = read_manifest(Path(prepared_dir) / "manifest.csv")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return {"path": _rel(root, raw_dvc.parent / outs[0]["path"]), "md5": outs[0]["md5"],
            "files": outs[0].get("nfiles"), "samples": len(rows),
            "class_counts": {k: counts[k] for k in sorted(counts, key=int)}}


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
    path = Path(model_dir) / "quantize.json"
    if not path.is_file():
        return None
    cal = read_json(path).get("calibration") or {}
    return {"sample_ids_sha256": cal.get("sample_ids_sha256"), "size": cal.get("size"), "method": cal.get("method")}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in LIBRARIES.items():
        try:
            out[key] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[key] = None
    return out


# ---------------------------------------------------------------------------------------------
# The files


def selftest_indices(labels: np.ndarray, sample_ids: np.ndarray, per_class: int) -> np.ndarray:
    """Up to `per_class` test images per class, lowest sample ids first; returned in sample-id order."""
    chosen = []
    for k in sorted(set(np.asarray(labels).tolist())):
        idx = np.flatnonzero(labels == k)
        chosen.extend(idx[np.argsort(sample_ids[idx], kind="stable")][:per_class].tolist())
    chosen = np.asarray(chosen, dtype=np.int64)
    return chosen[np.argsort(sample_ids[chosen], kind="stable")]


def preprocessing_record(model_bytes: bytes, image_size: int, defective_from: int, threshold: float,
                         num_classes: int) -> dict:
    proto = onnx.load_from_string(model_bytes)
    inits = {t.name for t in proto.graph.initializer}
    inp = [i for i in proto.graph.input if i.name not in inits][0]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inp.type.tensor_type.shape.dim]
    return {
        "input": {"name": inp.name, "shape": shape, "dtype": "float32", "layout": "NCHW"},
        "output": {"name": proto.graph.output[0].name, "kind": "logits", "shape": [shape[0], num_classes]},
        "source_image": {"dtype": "uint8", "channels": 1,
                         "color": "grayscale (8-bit; RGB converted with Pillow convert('L'))"},
        "resize": {"size": [image_size, image_size], "method": "area averaging (Pillow Image.resize, BOX)"},
        "scale": "x / 255 (float32 in [0, 1])", "mean": 0.0, "std": 1.0,
        "class_names": CLASS_NAMES[:num_classes],
        "defective_from_class": defective_from,
        "decision": {"p_defective": f"sum(softmax(logits)[{defective_from}:])", "threshold": threshold,
                     "rule": "defective when p_defective >= threshold"},
        "selftest": {"file": SELFTEST_FILE, "inputs": "images", "outputs": "logits", "atol": SELFTEST_ATOL},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(target: str, profile: TargetParams, chosen: Candidate, raw: dict, validation: dict,
               calibration: dict | None, num_classes: int, defective_from: int, splits: dict) -> str:
    m, t = chosen.metrics, chosen.threshold
    lines = [
        f"# Model card: {target} / {chosen.variant}", "",
        "## Intended use", "",
        "Screening electroluminescence (EL) images of single solar cells on a production line for defects. "
        f"Input: one cell, 8-bit grayscale, resized to {splits['image_size']}x{splits['image_size']} px. "
        "Output: four classes of defect probability (0, 1/3, 2/3, 1); a cell is judged *defective* when "
        f"the softmax mass on classes >= {defective_from} reaches the decision threshold. "
        "A decision aid for inspection staff: escapes happen at the rate below, so it does not replace "
        "the plant's final quality check.", "",
        f"Target profile `{target}`: {profile.description or '-'}; runtime {profile.runtime}, "
        f"{profile.threads} thread(s), batch {profile.batch}.", "",
        "## Data", "",
        f"- raw data `{raw['path']}` md5 `{raw['md5']}`, {raw['files']} files, {raw['samples']} samples",
        "- class counts: " + ", ".join(f"class {k}: {v}" for k, v in raw["class_counts"].items()),
        f"- validation: {validation['summary']} (result sha256 `{validation['sha256'][:16]}...`)",
        f"- test split: {m.get('n_test', '?')} samples; threshold chosen on the val split "
        f"({t.val['n_defective']} defective, {t.val['n_functional']} functional)",
    ]
    if calibration:
        lines.append(f"- INT8 calibration: {calibration['size']} train samples, {calibration['method']}, "
                     f"ids sha256 `{str(calibration['sample_ids_sha256'])[:16]}...`")
    lines += ["", "## Decision threshold", "",
              f"p_defective >= **{t.value}**: the highest threshold reaching defective recall "
              f">= {_pct(t.recall_target)} on the val split.", "",
              "| split | defective recall | escape rate | false-reject rate |", "|---|---:|---:|---:|",
              f"| val | {_pct(t.val['defective_recall'])} | {_pct(t.val['escape_rate'])} | {_pct(t.val['false_reject_rate'])} |",
              f"| test | {_pct(t.test['defective_recall'])} | {_pct(t.test['escape_rate'])} | {_pct(t.test['false_reject_rate'])} |",
              "", "## Metrics (test split, 4-class argmax)", "",
              f"- accuracy {_pct(m['accuracy'])}, balanced accuracy {_pct(m.get('balanced_accuracy', 0))}, "
              f"macro-F1 {m.get('macro_f1', 0):.3f}",
              f"- size {m['size_bytes']:,} B, {m.get('params', '?')} parameters, p50 latency "
              f"{m['latency_p50_ms']:.3f} ms (batch 1, measured by the evaluate stage on the build machine)", "",
              "| class | recall |", "|---|---:|"]
    for k in range(num_classes):
        lines.append(f"| {k} {CLASS_NAMES[k] if k < len(CLASS_NAMES) else ''} | {_pct(m.get(f'recall_class_{k}', 0.0))} |")
    lines += ["", "| cell type | accuracy | test samples |", "|---|---:|---:|"]
    for ct in ("mono", "poly"):
        if f"accuracy_{ct}" in m:
            lines.append(f"| {ct} | {_pct(m[f'accuracy_{ct}'])} | {m.get(f'n_test_{ct}', '?')} |")
    lines += ["", "## Gates", "", gate_table(target, [chosen]), "",
              "## Limits", "",
              "- Trained and judged on the data above only; other cell sizes, cameras, exposure or module "
              "types are out of scope until evaluated.",
              "- The middle classes (p=1/3, p=2/3) are small and hard; read per-class recall before relying on them.",
              "- Latency was measured on the build machine, not on the device: run the self-test and time it there.",
              f"- Self-test: `{SELFTEST_FILE}` holds golden images and logits; outputs must match within "
              f"atol {SELFTEST_ATOL}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The whole step


@dataclass(frozen=True)
class PackageInputs:
    """Where a package's inputs live (from argv) and the repo they belong to."""

    root: Path  # the git + DVC repo (the stage's working directory)
    reports_dir: Path
    models_dir: Path
    prepared_dir: Path
    validation_dir: Path
    raw_dvc: Path


@dataclass(frozen=True)
class BuildResult:
    variant: str
    package_id: str
    manifest_sha256: str
    archive_sha256: str
    candidates: list[Candidate]


def resolve_key(cfg: PackageParams, root: Path) -> Path:
    """The signing key: env LATHE_SIGNING_KEY, else package.private_key (relative to the repo)."""
    raw = os.environ.get(ENV_KEY) or cfg.private_key
    key = Path(raw)
    return key if key.is_absolute() else Path(root) / key


def _allow_dirty(cfg: PackageParams) -> bool:
    return cfg.allow_dirty or os.environ.get(ENV_ALLOW_DIRTY, "") in ("1", "true", "yes")


def build_package(target: str, profile: TargetParams, cfg: PackageParams, evaluate: EvaluateParams,
                  params: dict, inputs: PackageInputs, out_dir: Path, archive: Path) -> BuildResult:
    """Choose the variant for `target`, build the package folder and archive, swap them in.

    `params` is the whole params.yaml (recorded in the manifest). Raises LatheError (nothing
    written) when the tree is dirty without permission, the key is missing, or no variant passes.
    """
    from lathe.ingest import load_split

    root = Path(inputs.root)
    out_dir, archive = Path(out_dir), Path(archive)
    if out_dir.name != target or archive.name != f"{target}.tar.gz":
        raise ConfigError(f"package paths must end in {target}/ and {target}.tar.gz, got {out_dir} and {archive}")
    key = resolve_key(cfg, root)
    if not key.is_file():
        raise LatheError(f"signing key {key} not found; create a key pair with `lathe keys init` "
                         f"(or point {ENV_KEY} / package.private_key at one)")

    # 1. git: commit, time, dirty
    commit, built_at = git_head(root)
    own = {_rel(root, out_dir), _rel(root, archive), _rel(root, archive) + ".sha256"} | set(MEASUREMENT_REPORTS)
    if key.resolve().is_relative_to(root.resolve()):
        own.add(_rel(root, key.parent))  # the key pair must never be committed; it lives beside the repo's code
    dirty = dirty_paths(root, own)
    if dirty and not _allow_dirty(cfg):
        shown = "\n  ".join(dirty[:20]) + ("\n  ..." if len(dirty) > 20 else "")
        raise LatheError(f"the git tree has uncommitted changes; commit them first (a package records the commit "
                         f"it was built from), or set package.allow_dirty / {ENV_ALLOW_DIRTY}=1 to record a dirty "
                         f"build:\n  {shown}")

    # 2. candidates and gates
    splits = {s: load_split(inputs.prepared_dir, s) for s in (THRESHOLD_SPLIT, REPORT_SPLIT)}
    for s in splits.values():
        s["labels"] = s["labels"].astype(np.int64)
    splits_info = {**splits, "image_size": int(splits[REPORT_SPLIT]["images"].shape[1])}
    candidates, logits_of = [], {}
    for variant in cfg.variants:
        c, logits = evaluate_candidate(variant, Path(inputs.models_dir), Path(inputs.reports_dir), splits, profile,
                                       evaluate.defective_from_class)
        candidates.append(c)
        logits_of[variant] = logits
    chosen = select(candidates)
    if chosen is None:
        raise LatheError(f"no variant passes every gate of target '{target}'; the previous package is left "
                         f"as it was.\n\n{gate_table(target, candidates)}\n")

    # 3. lineage
    model_dir = Path(inputs.models_dir) / chosen.variant
    source_bytes = (model_dir / MODEL_FILE).read_bytes()
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        raise LatheError(f"{lock_path}: not found; run `dvc repro` so every upstream stage is locked before packaging")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    starts = [_rel(root, model_dir), _rel(root, Path(inputs.reports_dir) / chosen.variant / "metrics.json"),
              _rel(root, inputs.prepared_dir), _rel(root, inputs.validation_dir)]
    order, entries, leaves = stage_chain(lock, starts)
    raw = raw_data_record(root, Path(inputs.raw_dvc), inputs.prepared_dir)
    chain = sorted(leaves) + order + [f"package@{target}"]
    num_classes = int(logits_of[chosen.variant][REPORT_SPLIT].shape[1])

    # 4. files (unstamped model first: the manifest records its hash)
    model_unstamped = unstamped_model_bytes(source_bytes)
    test = splits[REPORT_SPLIT]
    idx = selftest_indices(test["labels"], test["sample_ids"], cfg.selftest_per_class)
    selftest = npz_bytes({"images": test["images"][idx].astype(np.uint8),
                          "logits": logits_of[chosen.variant][REPORT_SPLIT][idx].astype(np.float32),
                          "sample_ids": test["sample_ids"][idx].astype(np.int64),
                          "labels": test["labels"][idx].astype(np.int64)})
    preprocessing = json.dumps(preprocessing_record(model_unstamped, splits_info["image_size"],
                                                    evaluate.defective_from_class, chosen.threshold.value,
                                                    num_classes), indent=2, sort_keys=True) + "\n"
    validation = validation_record(inputs.validation_dir)
    calibration = calibration_record(model_dir)
    card = model_card(target, profile, chosen, raw, validation, calibration, num_classes,
                      evaluate.defective_from_class, splits_info)
    t = chosen.threshold
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "target": {"name": target, **profile.model_dump(mode="json")},
        "variant": chosen.variant,
        "files": {MODEL_FILE: sha256_bytes(model_unstamped), PREPROCESSING_FILE: sha256_bytes(preprocessing.encode()),
                  CARD_FILE: sha256_bytes(card.encode()), SELFTEST_FILE: sha256_bytes(selftest)},
        "source_model_sha256": sha256_bytes(source_bytes),
        "git": {"commit": commit, "dirty": bool(dirty), "dirty_allowed": _allow_dirty(cfg),
                **({"dirty_paths": dirty} if dirty else {})},
        "stages": entries,
        "chain": chain,
        "raw_data": raw,
        "validation": validation,
        "calibration": calibration,
        "params": copy.deepcopy(params),
        "libraries": library_versions(),
        "metrics": {"test": chosen.metrics,
                    "threshold": {"value": t.value, "recall_target": t.recall_target, "chosen_on": THRESHOLD_SPLIT,
                                  "defective_from_class": evaluate.defective_from_class, "val": t.val, "test": t.test}},
        "gates": chosen.gates,
        "selection": [{"variant": c.variant, "passed": c.passed, "size_bytes": c.metrics["size_bytes"],
                       "latency_p50_ms": c.metrics["latency_p50_ms"],
                       "failed": [g["gate"] for g in c.gates if not g["passed"]]} for c in candidates],
        "build": {"time": built_at, "flow_run_id": os.environ.get(ENV_FLOW_RUN) or None},
    }
    manifest["package_id"] = package_id_of(manifest)
    text = manifest_text(manifest)
    manifest_sha = sha256_bytes(text.encode())
    model_stamped = stamp_model_bytes(model_unstamped, manifest["package_id"], manifest_sha)
    if unstamped_model_bytes(model_stamped) != model_unstamped:
        raise LatheError("internal: stripping the stamp does not give back the unstamped model bytes")

    # 5. write beside the destination, sign, archive, swap in
    from lathe.archive import write_archive
    from lathe.signing import sign_package

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    archive.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_build(out_dir)
    # beside the destination (same filesystem: the swap is a rename), pid in the name (lathe.io)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
    try:
        pkg = work / target  # named as the destination: the archive's members live under <target>/
        pkg.mkdir()
        (pkg / MODEL_FILE).write_bytes(model_stamped)
        (pkg / PREPROCESSING_FILE).write_text(preprocessing, encoding="utf-8")
        (pkg / MANIFEST_FILE).write_text(text, encoding="utf-8")
        (pkg / CARD_FILE).write_text(card, encoding="utf-8")
        (pkg / SELFTEST_FILE).write_bytes(selftest)
        sign_package(pkg, key)
        mtime = int(datetime.strptime(built_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())
        staged_archive = work / archive.name
        digest = write_archive(pkg, staged_archive, mtime)
        _swap_dir(pkg, out_dir)
        os.replace(staged_archive, archive)
        os.replace(work / f"{archive.name}.sha256", archive.with_name(archive.name + ".sha256"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuildResult(chosen.variant, manifest["package_id"], manifest_sha, digest, candidates)


def recover_interrupted_build(dest: Path) -> None:
    """Clean up after a build that was killed (SIGKILL skips `finally`), before starting a new one.

    A staging folder `.<name>.<pid>.*.tmp` of a dead build is half a package: deleted (also by
    `lathe.io.remove_dead_temps_under`, which the flow runs before every stage, for when DVC skips
    this stage). A `.<name>.old-*` folder holds the previous package when the kill fell between the
    two renames of `_swap_dir`: put back at `dest` if `dest` is missing (the last good package is
    never lost), else deleted. DVC's lock on the stage's outs means no other writer of this target
    runs meanwhile.
    """
    remove_dead_temps(dest)
    for old in sorted(dest.parent.glob(f".{dest.name}.old-*")):
        if not dest.exists() and (old / dest.name).is_dir():
            os.rename(old / dest.name, dest)
        shutil.rmtree(old, ignore_errors=True)


def _swap_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`: rename the old one away, rename the new one in, delete the old.

    A crash between the two renames leaves the old package under `.<name>.old-*` beside `dest`
    (and no `dest`); never a folder mixing old and new files.
    """
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent)) / dest.name
        os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)
