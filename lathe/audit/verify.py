"""`lathe verify`: is this package (folder or shipped .tar.gz) the one that was built and signed, bound to
the target and id a plant expects, does it still work, and does it rebuild identically?

Checks run in a fixed order, each a named line (PASS, FAIL or SKIP with a reason):

1. offline, on bytes only: archive hash and safe extraction, manifest schema, binding (target name,
   pinned package id), file set, file hashes, the model's stamp, the choice of variant under the
   target's selection policy, preprocessing.json's schema and bounds, the model graph (parsed, never
   run), and the signature against trusted keys only (lathe.audit.integrity, .conformance and
   .signature; the keys from lathe.audit.trust);
2. only when every offline check passed: the self-test, in a confined child process
   (lathe.audit.selftest);
3. only then, and only with `--rebuild`: the rebuild at the recorded commit (lathe.audit.rebuild).

Nothing a package names is executed, checked out or loaded into onnxruntime before its signature
by a trusted key is verified. The package passes only when no line FAILs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lathe.audit.conformance import check_binding, check_model, check_preprocessing, check_selection
from lathe.audit.integrity import (
    check_archive_sidecar,
    check_file_set,
    check_hashes,
    check_manifest,
    check_stamp,
)
from lathe.audit.report import VerifyReport
from lathe.audit.signature import check_signature
from lathe.audit.trust import Trust
from lathe.errors import LatheError
from lathe.io import printable
from lathe.ship.contract import MANIFEST_FILE, MODEL_FILE, SELFTEST_FILE, Preprocessing

ARCHIVE_SUFFIX = ".tar.gz"


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
