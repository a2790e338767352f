"""Offline checks that a package's bytes are the ones it lists: the archive's sidecar hash, exactly the
package's files within their size limits, a manifest that parses, every file's sha256, and the model's
stamp binding it to this manifest and package id. Bytes are read, never run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lathe.audit.report import VerifyReport, _short
from lathe.errors import LatheError
from lathe.io import printable, sha256_bytes, sha256_file
from lathe.ship.contract import (
    MANIFEST_FILE,
    MANIFEST_SHA_KEY,
    MAX_FILE_BYTES,
    MODEL_FILE,
    PACKAGE_FILES,
    PACKAGE_ID_KEY,
    Manifest,
    model_stamp,
    package_id_of,
    parse_json_file,
    unstamped_model_bytes,
)


def read_package_file(pkg: Path, name: str) -> bytes:
    """A package file's bytes, only if it is a regular file within its size limit (never follows links)."""
    path = pkg / name
    if path.is_symlink() or not path.is_file():
        raise LatheError(f"{name} is missing or not a regular file")
    limit = MAX_FILE_BYTES.get(name, 0)
    size = path.stat().st_size
    if size > limit:
        raise LatheError(f"{name} is {size} bytes, more than a package file may be ({limit})")
    return path.read_bytes()


def unstamped_sha256(model: bytes) -> str:
    """sha256 of the model without its package stamp (what the manifest records)."""
    try:
        return sha256_bytes(unstamped_model_bytes(model))
    except Exception as exc:  # protobuf DecodeError on a damaged file
        raise LatheError(f"{MODEL_FILE} is not a readable ONNX model ({type(exc).__name__})") from None


def model_stamp_of(model: bytes) -> dict[str, str]:
    try:
        return model_stamp(model)
    except Exception as exc:
        raise LatheError(f"{MODEL_FILE} is not a readable ONNX model ({type(exc).__name__})") from None


def check_archive_sidecar(archive: Path, report: VerifyReport) -> None:
    """`<archive>.sha256` beside the archive: PASS, FAIL, or a SKIP line saying it was not checked."""
    side = archive.with_name(archive.name + ".sha256")
    if not side.is_file():
        report.add("archive sha256", "SKIP", f"no {printable(side.name)} beside the archive: its own hash was not "
                                             "checked (the signature below still covers every file in it)")
        return
    raw = side.read_bytes()[:4096]
    try:
        fields = raw.decode("ascii").split()
    except UnicodeDecodeError:
        report.add("archive sha256", "FAIL", f"{printable(side.name)} is not a sha256 line (not ASCII text)")
        return
    if len(fields) != 2 or len(fields[0]) != 64 or fields[1] != archive.name:
        report.add("archive sha256", "FAIL", f"{printable(side.name)} is not '<sha256>  {printable(archive.name)}'")
        return
    actual = sha256_file(archive)
    if actual == fields[0].lower():
        report.add("archive sha256", "PASS", f"{printable(archive.name)} matches {printable(side.name)}")
    else:
        report.add("archive sha256", "FAIL", f"{printable(archive.name)} sha256 {_short(actual)}... but "
                                             f"{printable(side.name)} says {_short(fields[0])}...")


def check_manifest(pkg: Path, report: VerifyReport) -> Manifest | None:
    with report.guard("manifest"):
        data = read_package_file(pkg, MANIFEST_FILE)
        try:
            raw = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise LatheError(f"{MANIFEST_FILE} is not valid JSON ({printable(str(exc), 120)})") from None
        manifest = parse_json_file(data, MANIFEST_FILE, Manifest)
        report.manifest, report.manifest_raw = manifest, raw
        report.facts.update({"package id": manifest.package_id, "target": manifest.target.name,
                             "variant": manifest.variant, "built": manifest.build.time})
        report.add("manifest", "PASS", f"{manifest.schema_}, {len(manifest.files)} files listed")
        return manifest
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_file_set(pkg: Path, report: VerifyReport) -> bool:
    """Exactly the package's files, each a regular file within its size limit; True when hashing is safe."""
    problems, unsafe = [], []
    entries = sorted(pkg.iterdir(), key=lambda p: p.name)
    names = {p.name for p in entries}
    for p in entries:
        shown = printable(p.name)
        if p.is_symlink() or not p.is_file():
            unsafe.append(f"{shown} ({'a link' if p.is_symlink() else 'not a regular file'})")
        elif p.name in MAX_FILE_BYTES and p.stat().st_size > MAX_FILE_BYTES[p.name]:
            unsafe.append(f"{shown} ({p.stat().st_size} bytes > limit {MAX_FILE_BYTES[p.name]})")
        elif p.name not in MAX_FILE_BYTES and p.stat().st_size > max(MAX_FILE_BYTES.values()):
            unsafe.append(f"{shown} ({p.stat().st_size} bytes)")
    extra = sorted(printable(n) for n in names - set(PACKAGE_FILES))
    missing = [n for n in PACKAGE_FILES if n not in names]
    if extra:
        problems.append(f"not part of a package (added): {', '.join(extra)}")
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unsafe:
        problems.append(f"not read: {', '.join(unsafe)}")
    if problems:
        report.add("file set", "FAIL", "; ".join(problems))
    else:
        report.add("file set", "PASS", f"exactly the {len(PACKAGE_FILES)} package files, regular and within limits")
    return not unsafe


def check_hashes(pkg: Path, manifest: Manifest, report: VerifyReport) -> None:
    for name, recorded in sorted(manifest.files.items()):
        with report.guard(f"hash {name}"):
            data = read_package_file(pkg, name)
            actual = unstamped_sha256(data) if name == MODEL_FILE else sha256_bytes(data)
            if actual == recorded:
                what = "unstamped sha256" if name == MODEL_FILE else "sha256"
                report.add(f"hash {name}", "PASS", f"{what} {_short(actual)}... matches {MANIFEST_FILE}")
            else:
                report.add(f"hash {name}", "FAIL", f"sha256 {_short(actual)}... but {MANIFEST_FILE} records "
                                                   f"{_short(recorded)}...: the file was changed")


def check_stamp(pkg: Path, manifest: Manifest, report: VerifyReport) -> None:
    """The model's stamp names this manifest (by hash) and this package id; the id matches the content."""
    with report.guard("model stamp"):
        manifest_sha = sha256_bytes(read_package_file(pkg, MANIFEST_FILE))
        stamp = model_stamp_of(read_package_file(pkg, MODEL_FILE))
        problems = []
        if stamp.get(MANIFEST_SHA_KEY) != manifest_sha:
            problems.append(f"{MANIFEST_FILE} hashes to {_short(manifest_sha)}... but the model was stamped with "
                            f"{_short(printable(stamp.get(MANIFEST_SHA_KEY) or 'nothing', 64))}...: not the manifest "
                            "it was built with")
        if stamp.get(PACKAGE_ID_KEY) != manifest.package_id:
            problems.append(f"the model's {PACKAGE_ID_KEY} is {printable(str(stamp.get(PACKAGE_ID_KEY)), 40)!r} but "
                            f"{MANIFEST_FILE} says {manifest.package_id!r}")
        recomputed = package_id_of(report.manifest_raw or {})
        if recomputed != manifest.package_id:
            problems.append(f"{MANIFEST_FILE}'s content hashes to package id {recomputed}, not the "
                            f"{manifest.package_id} it states: the manifest was edited")
        if problems:
            report.add("model stamp", "FAIL", "; ".join(problems))
        else:
            report.add("model stamp", "PASS", f"{PACKAGE_ID_KEY} and {MANIFEST_SHA_KEY} match {MANIFEST_FILE}")
