"""Build a device package for one target: choose the variant, set the threshold, record the lineage.

`build_package` is the whole step (the `package` stage calls it). It reads the evaluated variants
(models/<v>/model.onnx, reports/<v>/metrics.json), the prepared data, the validation result,
`data/raw.dvc`, `dvc.yaml`/`dvc.lock` (as YAML; DVC is never imported) and git (through the `git`
command), and writes `models/packages/<target>/` plus `<target>.tar.gz` and `.sha256`. The format is
docs/package-format.md (schema `lathe.package/2`).

Every check (dirty tree, signing key, gates) runs before anything is written; the package folder is
built beside the destination and swapped in with renames, so a failure or a crash leaves the old
package or the new one, never a mix. Given the same inputs and commit, every file except
`signature` is byte-identical (the build time is the commit time of HEAD).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lathe.determinism import machine_record, numerics_record
from lathe.errors import ConfigError, LatheError
from lathe.io import remove_dead_temps, sha256_bytes, temp_prefix
from lathe.ship.card import model_card, preprocessing_record, selftest_indices
from lathe.ship.contract import (
    CARD_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    SCHEMA,
    SELFTEST_FILE,
    manifest_text,
    npz_bytes,
    package_id_of,
    stamp_model_bytes,
    unstamped_model_bytes,
)
from lathe.ship.gates import (
    REPORT_SPLIT,
    THRESHOLD_SPLIT,
    Candidate,
    evaluate_candidates,
    gate_table,
    load_gate_splits,
    select,
    selection_row,
)
from lathe.ship.lineage import (
    MEASUREMENT_REPORTS,
    _rel,
    calibration_record,
    dirty_paths,
    git_head,
    library_versions,
    lock_record,
    qat_record,
    raw_data_record,
    stage_chain,
    validation_record,
)
from lathe.ship.params import PackageParams, TargetParams
from lathe.ship.signing import ENV_SIGNING_KEY, signing_key_path

ENV_ALLOW_DIRTY = "LATHE_ALLOW_DIRTY"
ENV_FLOW_RUN = "LATHE_FLOW_RUN_ID"


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
    return signing_key_path(cfg.private_key, root)


def _allow_dirty(cfg: PackageParams) -> bool:
    return cfg.allow_dirty or os.environ.get(ENV_ALLOW_DIRTY, "") in ("1", "true", "yes")


def build_package(target: str, profile: TargetParams, cfg: PackageParams, params: dict, inputs: PackageInputs,
                  out_dir: Path, archive: Path) -> BuildResult:
    """Choose the variant for `target`, build the package folder and archive, swap them in.

    `params` is the whole params.yaml (recorded in the manifest). Raises LatheError (nothing
    written) when the tree is dirty without permission, the key is missing, or no variant passes the gates
    that do not depend on the machine (`lathe.ship.gates.select`).
    """
    from lathe.data.contract import read_task

    root = Path(inputs.root)
    out_dir, archive = Path(out_dir), Path(archive)
    if out_dir.name != target or archive.name != f"{target}.tar.gz":
        raise ConfigError(f"package paths must end in {target}/ and {target}.tar.gz, got {out_dir} and {archive}")
    key = resolve_key(cfg, root)
    if not key.is_file():
        raise LatheError(f"signing key {key} not found; create a key pair with `lathe keys init` "
                         f"(or point {ENV_SIGNING_KEY} / package.private_key at one)")

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
    task = read_task(inputs.prepared_dir)
    splits = load_gate_splits(inputs.prepared_dir)
    candidates, logits_of = evaluate_candidates(cfg.variants, Path(inputs.models_dir), Path(inputs.reports_dir),
                                                splits, profile, task.defective_indices)
    chosen = select(candidates, profile.selection)
    if chosen is None:
        raise LatheError(f"no variant passes every gate of target '{target}' (but latency, which is measured here "
                         f"and does not decide); the previous package is left as it was.\n\n"
                         f"{gate_table(target, candidates)}\n")

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

    # 4. files (unstamped model first: the manifest records its hash)
    model_unstamped = unstamped_model_bytes(source_bytes)
    test = splits[REPORT_SPLIT]
    idx = selftest_indices(test["labels"], test["sample_ids"], cfg.selftest_per_class)
    selftest = npz_bytes({"images": test["images"][idx].astype(np.uint8),
                          "logits": logits_of[chosen.variant][REPORT_SPLIT][idx].astype(np.float32),
                          "sample_ids": test["sample_ids"][idx].astype(np.int64),
                          "labels": test["labels"][idx].astype(np.int64)})
    preprocessing = json.dumps(preprocessing_record(model_unstamped, task, chosen.threshold.value),
                               indent=2, sort_keys=True) + "\n"
    validation = validation_record(inputs.validation_dir)
    calibration, qat = calibration_record(model_dir), qat_record(model_dir)
    machine = machine_record()
    card = model_card(target, profile, chosen, candidates, raw, validation, calibration, qat, task, machine)
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
        "qat": qat,
        "params": copy.deepcopy(params),
        "libraries": library_versions(),
        "metrics": {"test": chosen.metrics,
                    "threshold": {"value": t.value, "recall_target": t.recall_target, "chosen_on": THRESHOLD_SPLIT,
                                  "defective_classes": list(task.defective), "val": t.val, "test": t.test}},
        "gates": chosen.gates,
        # every candidate, so a verifier can re-rank them under target.selection (lathe.ship.gates.RANKS)
        "selection": [selection_row(c) for c in candidates],
        "numerics": numerics_record(),  # the pins every stage ran under: the same on every machine
        # not identity (lathe.ship.contract.NOT_IDENTITY): when and where it was built, and the dvc.lock
        # as read (its bytes hold other stages' measured metrics)
        "build": {"time": built_at, "flow_run_id": os.environ.get(ENV_FLOW_RUN) or None, "machine": machine,
                  "lock": lock_record(root, lock_path, commit, entries)},
    }
    manifest["package_id"] = package_id_of(manifest)
    text = manifest_text(manifest)
    manifest_sha = sha256_bytes(text.encode())
    model_stamped = stamp_model_bytes(model_unstamped, manifest["package_id"], manifest_sha)
    if unstamped_model_bytes(model_stamped) != model_unstamped:
        raise LatheError("internal: stripping the stamp does not give back the unstamped model bytes")

    # 5. write beside the destination, sign, archive, swap in
    from lathe.ship.archive import write_archive
    from lathe.ship.signing import sign_package

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
        mtime = int(datetime.strptime(built_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
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
