"""`lathe verify`: is this package (folder or shipped .tar.gz) the one that was built and signed, bound to
the target and id a plant expects, does it still work, and does it rebuild identically?

Checks run in a fixed order, each a named line (PASS, FAIL or SKIP with a reason):

1. offline, on bytes only: archive hash and safe extraction, manifest schema, binding (target name,
   pinned package id), file set, file hashes, the model's stamp, the choice of variant under the
   target's selection policy, preprocessing.json's schema and
   bounds, the model graph (parsed, never run), and the signature against trusted keys only
   (lathe.audit.trust);
2. only when every offline check passed: the self-test, in a confined child process
   (lathe.audit.selftest);
3. only then, and only with `--rebuild`: the rebuild at the recorded commit (lathe.audit.rebuild).

Nothing a package names is executed, checked out or loaded into onnxruntime before its signature
by a trusted key is verified. The package passes only when no line FAILs.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lathe.audit.trust import Trust
from lathe.errors import LatheError
from lathe.io import printable, sha256_bytes
from lathe.ship.contract import (
    MANIFEST_FILE,
    MANIFEST_SHA_KEY,
    MAX_FILE_BYTES,
    MODEL_FILE,
    PACKAGE_FILES,
    PACKAGE_ID_KEY,
    PREPROCESSING_FILE,
    SELFTEST_FILE,
    Manifest,
    Preprocessing,
    package_id_of,
    parse_json_file,
)

Status = Literal["PASS", "FAIL", "SKIP", "INFO"]  # INFO: shown, not checked (measured values)
ARCHIVE_SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class Check:
    """One named verification line."""

    name: str
    status: Status
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "passed": self.passed, "message": self.message}


@dataclass
class VerifyReport:
    """Every check run against one package, in order, and what the package says it is."""

    subject: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # package id, target, variant, build time, key
    manifest: Manifest | None = None
    manifest_raw: dict | None = None
    debug: list[str] = field(default_factory=list)  # tracebacks of unexpected errors (shown with --debug)

    @property
    def ok(self) -> bool:
        """No check failed and the signature was verified by a trusted key (a skipped signature is not a pass)."""
        return self.status_of("signature") == "PASS" and not self.failed()

    def add(self, name: str, status: Status, message: str) -> None:
        self.checks.append(Check(name, status, message))

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def status_of(self, name: str) -> Status | None:
        return next((c.status for c in self.checks if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"package": self.subject, "ok": self.ok, "facts": self.facts,
                "checks": [c.as_dict() for c in self.checks]}

    @contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Any unexpected error inside becomes one FAIL line for `name` (its traceback kept for --debug)."""
        try:
            yield
        except LatheError as exc:
            self.add(name, "FAIL", str(exc))
        except Exception as exc:  # a bug or an input no check foresaw: still one line, never a traceback
            self.debug.append(traceback.format_exc())
            self.add(name, "FAIL", f"unexpected error ({type(exc).__name__}: {printable(str(exc), 160)})")


# ---------------------------------------------------------------------------------------------
# helpers


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


def _short(h: str | None) -> str:
    return (h or "none")[:16]


def unstamped_sha256(model: bytes) -> str:
    """sha256 of the model without its package stamp (what the manifest records)."""
    from lathe.ship.contract import unstamped_model_bytes

    try:
        return sha256_bytes(unstamped_model_bytes(model))
    except Exception as exc:  # protobuf DecodeError on a damaged file
        raise LatheError(f"{MODEL_FILE} is not a readable ONNX model ({type(exc).__name__})") from None


def model_stamp_of(model: bytes) -> dict[str, str]:
    from lathe.ship.contract import model_stamp

    try:
        return model_stamp(model)
    except Exception as exc:
        raise LatheError(f"{MODEL_FILE} is not a readable ONNX model ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------------------------
# offline checks


def check_archive_sidecar(archive: Path, report: VerifyReport) -> None:
    """`<archive>.sha256` beside the archive: PASS, FAIL, or a SKIP line saying it was not checked."""
    from lathe.io import sha256_file

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


def check_binding(manifest: Manifest, names: list[str], report: VerifyReport, target: str | None,
                  package_id: str | None) -> None:
    """The manifest's target against the folder/archive names and --target; its id against --package-id."""
    problems = []
    for name in names:
        if name != manifest.target.name:
            problems.append(f"the manifest says target {manifest.target.name!r} but the package is named "
                            f"{printable(name)!r} (renamed, or another target's package)")
    if target is not None and target != manifest.target.name:
        problems.append(f"expected target {printable(target)!r} (--target), the package is for {manifest.target.name!r}")
    if package_id is not None and package_id.lower() != manifest.package_id:
        problems.append(f"expected package {printable(package_id)} (--package-id), this is {manifest.package_id} "
                        "(an older or another build)")
    if problems:
        report.add("binding", "FAIL", "; ".join(problems))
        return
    pinned = f"package id {manifest.package_id} as pinned" if package_id else (
        "package id not pinned (pass --package-id from the deployment record to refuse older builds)")
    report.add("binding", "PASS", f"target {manifest.target.name} matches the package name"
                                  f"{' and --target' if target else ''}; {pinned}")


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


def check_selection(manifest: Manifest, report: VerifyReport) -> None:
    """The chosen variant is the best, under the target's selection policy, of the passing candidates listed."""
    from lathe.ship.gates import choice_problems, rank_rule

    with report.guard("selection"):
        policy, rows = manifest.target.selection, manifest.selection
        if policy is None or rows is None:
            why = ("the manifest names no selection policy (target.selection; built before policies existed)"
                   if policy is None else f"policy {policy}, but the manifest lists no candidates")
            report.add("selection", "SKIP", f"{why}: the choice of {manifest.variant} is not checked")
            return
        test = manifest.metrics.get("test")
        problems = choice_problems(policy, manifest.variant, [r.model_dump() for r in rows],
                                   test if isinstance(test, dict) else {})
        if problems:
            report.add("selection", "FAIL", printable("; ".join(problems), 600))
        else:
            passing = sum(r.passed for r in rows)
            report.add("selection", "PASS", f"{manifest.variant} is policy {policy}'s best ({rank_rule(policy)}) "
                                            f"of the {passing} listed candidates passing every gate")


def check_preprocessing(pkg: Path, report: VerifyReport) -> Preprocessing | None:
    with report.guard("preprocessing"):
        pre = parse_json_file(read_package_file(pkg, PREPROCESSING_FILE), PREPROCESSING_FILE, Preprocessing)
        report.add("preprocessing", "PASS", f"input {pre.input.shape}, {len(pre.class_names)} classes, threshold "
                                            f"{pre.decision.threshold:g}, all values within bounds")
        return pre
    return None


def check_model(pkg: Path, pre: Preprocessing | None, report: VerifyReport) -> None:
    from lathe.audit.selftest import check_model_graph

    if pre is None:
        report.add("model graph", "SKIP", f"needs a valid {PREPROCESSING_FILE}")
        return
    with report.guard("model graph"):
        summary = check_model_graph(read_package_file(pkg, MODEL_FILE), pre)
        report.add("model graph", "PASS", f"parsed, not run: {summary}")


def check_signature(pkg: Path, trust: Trust, report: VerifyReport, name: str = "signature") -> None:
    """The signature against each trusted key (the one the signature names first); names the key that made it."""
    from lathe.ship.signing import SignatureError, read_signature, signature_key_hint, verify_signature

    with report.guard(name):
        if not trust.keys:
            report.add(name, "SKIP", f"not checked: no trusted key ({'; '.join(trust.problems) or trust.source})")
            return
        hint = signature_key_hint(read_signature(pkg))
        keys = sorted(trust.keys, key=lambda k: k.fingerprint != hint)
        errors = []
        for key in keys:
            try:
                verify_signature(pkg, key.path)
            except SignatureError as exc:
                errors.append((key, str(exc)))
                continue
            report.facts["signed by"] = f"{key.short} ({trust.source})"
            report.add(name, "PASS", f"valid, made by key {key.short} from {printable(trust.source)} "
                                     f"({printable(str(key.path))}); covers every file")
            return
        named = trust.by_fingerprint(hint)
        if named is not None:  # the signer is trusted, so its verdict on the files is the one that matters
            report.add(name, "FAIL", f"key {named.short}: {next(msg for k, msg in errors if k is named)}")
            return
        trusted = ", ".join(k.short for k in trust.keys)
        report.add(name, "FAIL", f"made by key {('sha256:' + hint[:16]) if hint else '(unnamed)'}, which is not "
                                 f"trusted (trusted: {trusted} from {printable(trust.source)})")


def offline_checks(pkg: Path, trust: Trust, report: VerifyReport, names: list[str], target: str | None = None,
                   package_id: str | None = None) -> Preprocessing | None:
    """Every check that reads bytes only; returns the parsed preprocessing.json (None if invalid)."""
    hashing_safe = check_file_set(pkg, report)
    manifest = check_manifest(pkg, report)
    if manifest is not None:
        check_binding(manifest, names, report, target, package_id)
        check_hashes(pkg, manifest, report)
        check_stamp(pkg, manifest, report)
        check_selection(manifest, report)
    else:
        for what in ("binding", "hashes", "model stamp", "selection"):
            report.add(what, "SKIP", f"needs a valid {MANIFEST_FILE}")
    pre = check_preprocessing(pkg, report)
    check_model(pkg, pre, report)
    if hashing_safe:
        check_signature(pkg, trust, report)
    else:
        report.add("signature", "FAIL", "not checked: the folder holds files that are not read (see file set)")
    return pre


# ---------------------------------------------------------------------------------------------
# entry point


def verify_package(subject: Path, trust: Trust, *, target: str | None = None, package_id: str | None = None,
                   rebuild: bool = False, repo: Path | None = None, full: bool = False) -> VerifyReport:
    """Verify a package folder or a shipped `<target>.tar.gz` (unpacked with limits to a temp folder first)."""
    from lathe.ship.archive import ArchiveError, extract_package

    src = Path(subject)
    report = VerifyReport(subject=printable(str(src)))
    if not src.exists():
        report.add("package", "FAIL", f"{printable(str(src))} does not exist")
        return report
    with tempfile.TemporaryDirectory(prefix="lathe-verify-") as tmp:
        if src.is_dir():
            pkg, names = src, [src.name]
        else:
            if not src.name.endswith(ARCHIVE_SUFFIX):
                report.add("package", "FAIL", f"{printable(src.name)} is neither a package folder nor a "
                                              f"<target>{ARCHIVE_SUFFIX} archive")
                return report
            check_archive_sidecar(src, report)
            try:
                pkg = extract_package(src, Path(tmp) / "x")
            except ArchiveError as exc:
                report.add("archive", "FAIL", str(exc))
                return report
            except OSError as exc:
                report.add("archive", "FAIL", f"{printable(str(src))}: cannot be unpacked ({exc.strerror or exc})")
                return report
            report.add("archive", "PASS", f"unpacked safely ({pkg.name}/, {len(list(pkg.iterdir()))} files)")
            names = [src.name.removesuffix(ARCHIVE_SUFFIX), pkg.name]
        pre = offline_checks(pkg, trust, report, names, target, package_id)
        report.facts["trusted keys"] = f"{printable(trust.source)} ({len(trust.keys)} key(s))"
        _selftest_if_trusted(pkg, pre, report)
        if rebuild:
            if not report.ok:
                report.add("rebuild", "SKIP", "not attempted: a check above failed, so nothing the package names "
                                              "(its commit, its code) is run")
            else:
                from lathe.audit.rebuild import rebuild_and_compare

                with report.guard("rebuild"):
                    rebuild_and_compare(pkg, report.manifest_raw or {}, Path(repo or Path.cwd()), trust, report,
                                        full=full, archive=None if src.is_dir() else src)
    return report


def _selftest_if_trusted(pkg: Path, pre: Preprocessing | None, report: VerifyReport) -> None:
    from lathe.audit.selftest import read_selftest_headers, run_selftest

    if report.failed() or pre is None or report.status_of("signature") != "PASS":
        why = "failed" if report.failed() else "could not verify the signature"
        report.add("self-test", "SKIP", f"not run: the offline checks above {why}, so the model is not loaded")
        return
    with report.guard("self-test"):
        specs = read_selftest_headers(pkg / SELFTEST_FILE)
        images = specs["images"][0]
        if list(images[-2:]) != pre.input.shape[2:]:
            raise LatheError(f"{SELFTEST_FILE} images are {images[-2:]}, the model takes {pre.input.shape[2:]}")
        report.add("self-test", "PASS", run_selftest((pkg / MODEL_FILE).resolve(), (pkg / SELFTEST_FILE).resolve(), pre))
